"""The records kept with what the query service answers from. PURE.

A Catalog is told every record change (`put`, `remove`, `reset`) and keeps,
beside the records:

- the worker ids in order, so a page of a listing starts at its cursor by
  bisection and costs the page, not the fleet;
- the Stats counts, added to and taken from as records change;
- the available workers by profile (capability and content types; a fleet has
  a handful), each profile's workers sorted by `query.record_key`, so a pick
  looks at the first worker of each profile that can take the job.

Every answer is the one the scan functions give over the same records
(`query.select` order, `query.stats`, `query.pick`); tests/unit/test_catalog.py
holds them to it. No I/O, no clock.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from registry import query
from registry.protocol import WorkerCapability, WorkerInfo

RecordKey = tuple[float, int, str]
Profile = tuple[WorkerCapability, tuple[str, ...]]

_CACHED_REQUESTS: Final = 10_000  # content types are the callers' strings


class Catalog:
    def __init__(self, records: Iterable[WorkerInfo] = ()) -> None:
        self._records: dict[str, WorkerInfo] = {}
        self._ids: list[str] = []
        self._counts = dict.fromkeys(query.Stats.__struct_fields__, 0)
        self._available: dict[Profile, list[RecordKey]] = {}
        self._serving: dict[tuple[WorkerCapability | None, str | None], list[list[RecordKey]]] = {}
        self.reset(records)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def records(self) -> Mapping[str, WorkerInfo]:
        return self._records

    # ------------------------------------------------------------ changes

    def reset(self, records: Iterable[WorkerInfo]) -> None:
        """Start over from these records (the projector reloaded the bucket)."""
        self._records = {}
        self._counts = dict.fromkeys(self._counts, 0)
        self._available = {}
        self._serving = {}
        for r in records:
            self._records[r.worker_id] = r
            self._add(r)
        self._ids = sorted(self._records)

    def put(self, record: WorkerInfo) -> None:
        """A worker's record is now `record` (new, or replacing its previous one)."""
        wid = record.worker_id
        old = self._records.get(wid)
        self._records[wid] = record
        if old is None:
            bisect.insort(self._ids, wid)
        elif _same_place(old, record):
            return  # most heartbeats: only metrics and times moved
        else:
            self._take(old)
        self._add(record)

    def remove(self, worker_id: str) -> None:
        """The worker's record is gone (purged); an unknown id is a no-op."""
        old = self._records.pop(worker_id, None)
        if old is not None:
            self._take(old)
            del self._ids[bisect.bisect_left(self._ids, worker_id)]

    def compact(self) -> None:
        """Tables at the size of what is left, after many records were removed (a dict
        keeps the size of its peak)."""
        self._records = dict(self._records)
        self._ids = list(self._ids)

    # ------------------------------------------------------------ answers

    def stats(self) -> query.Stats:
        return query.Stats(**self._counts)

    def pick(
        self, capability: WorkerCapability | None = None, content_type: str | None = None
    ) -> WorkerInfo | None:
        """`query.pick` over the records: the least loaded available worker, or None."""
        firsts = [keys[0] for keys in self._candidates(capability, content_type) if keys]
        return self._records[min(firsts)[2]] if firsts else None

    def after(self, cursor: str | None) -> Iterator[WorkerInfo]:
        """The records in worker id order, from the first id above `cursor` (all: None).

        Read it to the end, or as far as wanted, before the catalog changes again."""
        ids = self._ids
        start = 0 if cursor is None else bisect.bisect_right(ids, cursor)
        for i in range(start, len(ids)):
            yield self._records[ids[i]]

    def is_last(self, worker_id: str) -> bool:
        """No worker id comes after this one."""
        return not self._ids or self._ids[-1] <= worker_id

    # ------------------------------------------------------------ internals

    def _add(self, r: WorkerInfo) -> None:
        for name in query.counted_in(r):
            self._counts[name] += 1
        if pickable(r):
            keys = self._available.get(_profile(r))
            if keys is None:
                keys = self._available[_profile(r)] = []
                self._serving.clear()  # a new profile may serve cached requests
            bisect.insort(keys, query.record_key(r))

    def _take(self, r: WorkerInfo) -> None:
        for name in query.counted_in(r):
            self._counts[name] -= 1
        if pickable(r):
            profile = _profile(r)
            keys = self._available[profile]
            del keys[bisect.bisect_left(keys, query.record_key(r))]
            if not keys:
                del self._available[profile]
                self._serving.clear()

    def _candidates(
        self, capability: WorkerCapability | None, content_type: str | None
    ) -> list[list[RecordKey]]:
        """The sorted keys of every profile that serves the request (cached per request)."""
        request = (capability, content_type)
        found = self._serving.get(request)
        if found is None:
            found = [
                keys for (cap, types), keys in self._available.items()
                if query.capability_matches(capability, cap, picking=True)
                and query.serves(list(types), content_type)
            ]  # fmt: skip
            if len(self._serving) >= _CACHED_REQUESTS:
                self._serving.clear()
            self._serving[request] = found
        return found


def _same_place(old: WorkerInfo, new: WorkerInfo) -> bool:
    """Nothing the counts, the profiles or the pick order read differs between two
    records of one worker: `query.counted_in`, `pickable`, `_profile`, `record_key`."""
    a, b = old.registration, new.registration
    return (
        old.live == new.live and old.available == new.available and old.status is new.status
        and old.metrics.active_tasks == new.metrics.active_tasks
        and (a is b or (
            a.capability is b.capability and a.max_concurrent_tasks == b.max_concurrent_tasks
            and a.supported_content_types == b.supported_content_types
        ))
    )  # fmt: skip


def pickable(r: WorkerInfo) -> bool:
    """What `query.pick` asks of a worker besides capability and content type."""
    return r.live and r.available


def _profile(r: WorkerInfo) -> Profile:
    reg = r.registration
    return (reg.capability, tuple(reg.supported_content_types))
