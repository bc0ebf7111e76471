"""The fold: evolve(record, event, seq, stored_at) -> outcome. PURE.

No I/O, no clock, no logs: the same inputs always give the same outcome, so a
replay of the stream rebuilds exactly the same records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, assert_never

import msgspec

from registry.protocol import (
    MIN_LATE_FACTOR,
    MIN_TIMEOUT_FACTOR,
    ZERO_METRICS,
    Availability,
    Cordon,
    CordonEvent,
    DrainEvent,
    Event,
    ExpiredEvent,
    HeartbeatEvent,
    LateEvent,
    OfflineReason,
    RegisterEvent,
    UncordonEvent,
    UnregisterEvent,
    WorkerInfo,
    WorkerStatus,
)


@dataclass(frozen=True, slots=True)
class Applied:
    record: WorkerInfo


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Already folded (seq at or below the record's event_seq)."""


@dataclass(frozen=True, slots=True)
class Ignored:
    """A valid event with no effect (stale incarnation, expiry overtaken, ...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Premature(Ignored):
    """A verdict (expired, late) stored before the silence it claims, or claiming less
    silence than the registry ever judges: ignored. The sweeper judges again."""


PREMATURE: Final = "verdict before the worker was silent for"


@dataclass(frozen=True, slots=True)
class Unregistered:
    """A heartbeat with no registration behind it: the agent must register again."""

    reason: str


Outcome = Applied | Duplicate | Ignored | Unregistered  # Premature is an Ignored


def is_available(
    status: WorkerStatus, live: bool, active: int, max_tasks: int, late: bool = False,
    cordoned: bool = False,
) -> bool:  # fmt: skip
    return (
        live and not late and not cordoned and status is WorkerStatus.ONLINE and active < max_tasks
    )


def _with(record: WorkerInfo, seq: int, **changes: object) -> WorkerInfo:
    new = msgspec.structs.replace(record, event_seq=seq, version=record.version + 1, **changes)
    available = is_available(
        new.status, new.live, new.metrics.active_tasks, new.registration.max_concurrent_tasks,
        new.late, new.cordon is not None,
    )  # fmt: skip
    return msgspec.structs.replace(new, available=available)


def _register(record: WorkerInfo | None, e: RegisterEvent, seq: int, at: datetime) -> Outcome:
    same_life = record is not None and record.live and record.incarnation == e.incarnation
    base = record if same_life and record is not None else None
    fresh = WorkerInfo(
        registration=e.registration,
        status=base.status if base else WorkerStatus.ONLINE,
        metrics=base.metrics if base else ZERO_METRICS,
        last_heartbeat=at,
        registered_at=base.registered_at if base else at,
        event_seq=seq,
        incarnation=e.incarnation,
        version=record.version if record else 0,
        heartbeat_interval_s=e.heartbeat_interval_s,
        last_heartbeat_seq=seq,
        cordon=record.cordon if record else None,  # an operator's cordon outlives a restart
    )
    return Applied(_with(fresh, seq))


def _heartbeat(record: WorkerInfo | None, e: HeartbeatEvent, seq: int, at: datetime) -> Outcome:
    if record is None:
        return Unregistered("heartbeat from a worker that never registered")
    if record.incarnation != e.incarnation:
        if record.live:
            return Ignored("stale incarnation: heartbeat from a process that was replaced")
        return Unregistered("heartbeat from an incarnation that never registered")
    if record.offline_reason is OfflineReason.UNREGISTERED:
        return Unregistered("heartbeat after unregister")
    return Applied(
        _with(
            record, seq, status=e.status, metrics=e.metrics, last_heartbeat=at,
            last_heartbeat_seq=seq, offline_reason=None, offline_at=None, late=False,
        )
    )  # fmt: skip


def _unregister(record: WorkerInfo | None, e: UnregisterEvent, seq: int, at: datetime) -> Outcome:
    if record is None:
        return Ignored("unregister of an unknown worker")
    if record.incarnation != e.incarnation:
        return Ignored("stale incarnation: unregister from a process that was replaced")
    if record.offline_reason is OfflineReason.UNREGISTERED:
        return Ignored("already unregistered")
    return Applied(_offline(record, seq, at, OfflineReason.UNREGISTERED))


def _expired(record: WorkerInfo | None, e: ExpiredEvent, seq: int, at: datetime) -> Outcome:
    if record is None:
        return Ignored("expiry of an unknown worker")
    if not record.live:
        return Ignored(f"already offline ({record.offline_reason})")
    if record.last_heartbeat != e.last_heartbeat:
        return Ignored("a heartbeat arrived after the one the sweeper judged")
    least = MIN_TIMEOUT_FACTOR * record.heartbeat_interval_s
    if premature := silence_problem(e.timeout_s, least, record.last_heartbeat, at):
        return premature
    return Applied(_offline(record, seq, at, OfflineReason.EXPIRED))


def _late(record: WorkerInfo | None, e: LateEvent, seq: int, at: datetime) -> Outcome:
    if record is None or not record.live:
        return Ignored("late notice for a worker that is not live")
    if record.last_heartbeat != e.last_heartbeat:
        return Ignored("a heartbeat arrived after the one the sweeper judged late")
    if record.late:
        return Ignored("already late")
    least = MIN_LATE_FACTOR * record.heartbeat_interval_s
    if premature := silence_problem(e.late_after_s, least, record.last_heartbeat, at):
        return premature
    return Applied(_with(record, seq, late=True))


def _cordon(record: WorkerInfo | None, e: CordonEvent, seq: int, at: datetime) -> Outcome:
    if record is None:
        return Ignored("cordon of an unknown worker")
    if record.cordon is not None and record.cordon.drain:
        return Ignored("already draining (uncordon first to change it)")
    cordon = Cordon(by=e.by, reason=e.reason, at=at, event_seq=seq)
    return Applied(_with(record, seq, cordon=cordon))


def _drain(record: WorkerInfo | None, e: DrainEvent, seq: int, at: datetime) -> Outcome:
    if record is None:
        return Ignored("drain of an unknown worker")
    incarnation = record.incarnation if record.live else ""
    if record.cordon is not None and record.cordon.drain and record.cordon.incarnation == incarnation:
        return Ignored("already draining")
    cordon = Cordon(by=e.by, reason=e.reason, at=at, drain=True, incarnation=incarnation,
                    event_seq=seq)  # fmt: skip
    return Applied(_with(record, seq, cordon=cordon))


def _uncordon(record: WorkerInfo | None, e: UncordonEvent, seq: int, at: datetime) -> Outcome:
    if record is None:
        return Ignored("uncordon of an unknown worker")
    if record.cordon is None:
        return Ignored("not cordoned")
    return Applied(_with(record, seq, cordon=None))


def cordon_state(record: WorkerInfo) -> str | None:
    """`cordoned`, `draining` (its live process was told to finish and leave) or `drained`
    (that process has left); None when no operator holds the worker."""
    c = record.cordon
    if c is None:
        return None
    if not c.drain:
        return "cordoned"
    return "draining" if draining(record) else "drained"


def draining(record: WorkerInfo) -> bool:
    """The live process of this record was told to finish and leave (and has not yet)."""
    c = record.cordon
    return c is not None and c.drain and record.live and c.incarnation == record.incarnation


def silence_problem(
    claimed_s: float, least_s: float, last_heartbeat: datetime, stored_at: datetime
) -> Premature | None:
    """Why a verdict claiming `claimed_s` of silence, stored at `stored_at`, is refused.

    Both times are JetStream's stored times, so anyone's clock but the server's is
    out of it: a verdict is applied only once the worker was silent for what it
    claims, and only if it claims at least `least_s` (the contract's minimum
    factor of the worker's interval), so a verdict forged right after a beat, or
    claiming a tiny timeout, changes nothing.
    """
    if claimed_s < least_s:
        return Premature(f"{PREMATURE} {least_s:g}s: it claims {claimed_s:g}s, under the least "
                         "the registry ever judges")  # fmt: skip
    silent_s = (stored_at - last_heartbeat).total_seconds()
    if silent_s < claimed_s:
        return Premature(f"{PREMATURE} {claimed_s:g}s: stored {silent_s:.3f}s after its "
                         "last heartbeat")  # fmt: skip
    return None


def _offline(record: WorkerInfo, seq: int, at: datetime, reason: OfflineReason) -> WorkerInfo:
    return _with(
        record, seq, status=WorkerStatus.OFFLINE, offline_reason=reason, offline_at=at, late=False
    )


def evolve(record: WorkerInfo | None, event: Event, seq: int, stored_at: datetime) -> Outcome:
    """Fold one event (stream sequence `seq`, stored by JetStream at `stored_at`)."""
    if record is not None and seq <= record.event_seq:
        return Duplicate()
    match event:
        case RegisterEvent():
            return _register(record, event, seq, stored_at)
        case HeartbeatEvent():
            return _heartbeat(record, event, seq, stored_at)
        case UnregisterEvent():
            return _unregister(record, event, seq, stored_at)
        case ExpiredEvent():
            return _expired(record, event, seq, stored_at)
        case LateEvent():
            return _late(record, event, seq, stored_at)
        case CordonEvent():
            return _cordon(record, event, seq, stored_at)
        case DrainEvent():
            return _drain(record, event, seq, stored_at)
        case UncordonEvent():
            return _uncordon(record, event, seq, stored_at)
        case _:
            assert_never(event)


def availability_reason(record: WorkerInfo) -> str:
    if record.offline_reason is not None:
        return str(record.offline_reason)
    if record.late:
        return "late"
    if (held := cordon_state(record)) is not None:
        return held
    if record.status is not WorkerStatus.ONLINE:
        return str(record.status)
    if record.metrics.active_tasks >= record.registration.max_concurrent_tasks:
        return "full"
    return "ok"


def availability(record: WorkerInfo) -> Availability:
    """What routers see of a record (published on worker.available.<id>)."""
    reg = record.registration
    return Availability(
        worker_id=reg.worker_id,
        available=record.available,
        status=record.status,
        capability=reg.capability,
        supported_content_types=reg.supported_content_types,
        active_tasks=record.metrics.active_tasks,
        max_concurrent_tasks=reg.max_concurrent_tasks,
        reason=availability_reason(record),
        changed_at=record.offline_at or record.last_heartbeat,
        event_seq=record.event_seq,
    )


def routing_key(record: WorkerInfo | None) -> tuple[object, ...] | None:
    """The fields a router decides on; a change here is announced."""
    if record is None:
        return None
    reg = record.registration
    return (
        record.available, record.status, reg.capability, tuple(reg.supported_content_types),
        reg.max_concurrent_tasks - record.metrics.active_tasks,
        None if record.cordon is None else record.cordon.drain,
    )  # fmt: skip
