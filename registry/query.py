"""Filter, rank, count and pick over worker records. PURE.

No I/O, no clock: the query service, the operator commands and the tests call
these with records they already hold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import msgspec

from registry.protocol import WorkerCapability, WorkerInfo, WorkerStatus

_FOR: Final = {
    WorkerCapability.CPU: (WorkerCapability.CPU, WorkerCapability.HYBRID),
    WorkerCapability.GPU: (WorkerCapability.GPU, WorkerCapability.HYBRID),
    WorkerCapability.HYBRID: (WorkerCapability.HYBRID,),
}


class QueryError(ValueError):
    """A request that cannot be answered as asked (bad tag, unknown value)."""


class Filter(msgspec.Struct, frozen=True, kw_only=True):
    """What a listing asks for; every field left at its default matches everything live."""

    capability: WorkerCapability | None = None
    content_type: str | None = None
    status: WorkerStatus | None = None
    available: bool | None = None
    tags: dict[str, str] = {}
    include_offline: bool = False
    for_picking: bool = False


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """The fleet as the original plan counts it: live workers, plus offline records."""

    total: int = 0
    online: int = 0
    offline: int = 0
    busy: int = 0
    gpu_workers: int = 0
    cpu_workers: int = 0
    hybrid_workers: int = 0
    available: int = 0


def parse_tags(pairs: Iterable[str]) -> dict[str, str]:
    """`["zone=eu", "tier=spot"]` -> `{"zone": "eu", "tier": "spot"}`."""
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise QueryError(f"invalid tag {pair!r}: use key=value")
        tags[key] = value
    return tags


def capability_matches(
    asked: WorkerCapability | None, has: WorkerCapability, picking: bool
) -> bool:
    """Exact for listings; for picking, C is served by C or hybrid."""
    if asked is None:
        return True
    return has in _FOR[asked] if picking else has is asked


def serves(content_types: list[str], asked: str | None) -> bool:
    """A worker serves a content type it lists; an empty list means any."""
    return asked is None or not content_types or asked in content_types


def matches(record: WorkerInfo, f: Filter) -> bool:
    reg = record.registration
    if not (record.live or f.include_offline or f.status is WorkerStatus.OFFLINE):
        return False
    return (
        capability_matches(f.capability, reg.capability, f.for_picking)
        and serves(reg.supported_content_types, f.content_type)
        and (f.status is None or record.status is f.status)
        and (f.available is None or record.available is f.available)
        and all(reg.tags.get(k) == v for k, v in f.tags.items())
    )


def select(records: Iterable[WorkerInfo], f: Filter) -> list[WorkerInfo]:
    """The records that match, ordered by worker id (stable output for people)."""
    return sorted((r for r in records if matches(r, f)), key=lambda r: r.worker_id)


def load_key(active: int, max_tasks: int, worker_id: str = "") -> tuple[float, int, str]:
    """Least loaded first: active/max ascending, then more free slots, then id."""
    return (active / max_tasks, active - max_tasks, worker_id)


def record_key(record: WorkerInfo) -> tuple[float, int, str]:
    return load_key(
        record.metrics.active_tasks, record.registration.max_concurrent_tasks, record.worker_id
    )


def rank(records: Iterable[WorkerInfo]) -> list[WorkerInfo]:
    return sorted(records, key=record_key)


def pick(
    records: Iterable[WorkerInfo],
    capability: WorkerCapability | None = None,
    content_type: str | None = None,
) -> WorkerInfo | None:
    """The least loaded available worker for a job, or None when nobody can take it."""
    f = Filter(capability=capability, content_type=content_type, available=True, for_picking=True)
    candidates = (r for r in records if matches(r, f))
    return min(candidates, key=record_key, default=None)


def counted_in(r: WorkerInfo) -> list[str]:
    """The Stats fields one record adds 1 to: what `stats` counts, one record at a time
    (registry.catalog keeps the counts as records change)."""
    if not r.live:
        return ["offline"]
    names = ["total", f"{r.registration.capability}_workers"]
    if r.status is WorkerStatus.ONLINE:
        names.append("online")
    elif r.status is WorkerStatus.BUSY:
        names.append("busy")
    if r.available:
        names.append("available")
    return names


def stats(records: Iterable[WorkerInfo]) -> Stats:
    counts = dict.fromkeys(Stats.__struct_fields__, 0)
    for r in records:
        if not r.live:
            counts["offline"] += 1
            continue
        counts["total"] += 1
        counts["online"] += r.status is WorkerStatus.ONLINE
        counts["busy"] += r.status is WorkerStatus.BUSY
        counts["available"] += r.available
        counts[f"{r.registration.capability}_workers"] += 1
    return Stats(**counts)
