"""The router's index: pure, no NATS, clock passed in (see registry.router.client).

The index groups workers by profile (capability and content types; a fleet
has a handful) and, inside each, the available ones by load level in sorted
order, so pick() costs a few dictionary look-ups whatever the size of the
fleet. A pick holds one of the worker's free slots until the worker's next
availability update (or `hold_s`, or `release()`), so one router does not pile
jobs onto the same worker between two heartbeats; ties are broken at random,
so several routers spread over equally good workers instead of all choosing
the same one.

Imports: `registry.protocol` only.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Iterable
from typing import Final

import msgspec

from registry.protocol import Availability

LoadKey = tuple[float, int]
"""(busy fraction, -free slots): smaller is less loaded."""

_SERVED_BY: Final = {
    "cpu": ("cpu", "hybrid"),
    "gpu": ("gpu", "hybrid"),
    "hybrid": ("hybrid",),
}
_ALL_CAPABILITIES: Final = ("cpu", "gpu", "hybrid")


class _Level:
    """The workers at one load level: O(1) add, remove and uniform random choice."""

    __slots__ = ("ids", "pos")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}

    def add(self, wid: str) -> None:
        self.pos[wid] = len(self.ids)
        self.ids.append(wid)

    def remove(self, wid: str) -> None:
        i = self.pos.pop(wid)
        last = self.ids.pop()
        if last != wid:
            self.ids[i] = last
            self.pos[last] = i


class LoadBucket:
    """Workers of one profile that can take a job now, by load level (levels kept sorted)."""

    __slots__ = ("keys", "levels")

    def __init__(self) -> None:
        self.keys: list[LoadKey] = []
        self.levels: dict[LoadKey, _Level] = {}

    def add(self, wid: str, key: LoadKey) -> None:
        level = self.levels.get(key)
        if level is None:
            level = self.levels[key] = _Level()
            bisect.insort(self.keys, key)
        level.add(wid)

    def remove(self, wid: str, key: LoadKey) -> None:
        level = self.levels[key]
        level.remove(wid)
        if not level.ids:
            del self.levels[key]
            del self.keys[bisect.bisect_left(self.keys, key)]

    def ordered(self) -> Iterable[tuple[LoadKey, str]]:
        for key in self.keys:
            for wid in sorted(self.levels[key].ids):
                yield key, wid


class _Profile:
    """What a job asks of a worker: its capability and content types. Workers
    that share a profile share one LoadBucket and one content-type list, so a
    worker costs one entry in the index however many types it takes."""

    __slots__ = ("bucket", "content_types", "key", "types", "workers")

    def __init__(self, key: tuple[str, tuple[str, ...]], content_types: list[str]) -> None:
        self.key = key  # (capability, content types as listed)
        self.workers = 0  # in the index with this profile; at 0 the profile is dropped
        self.content_types = content_types  # shared by every Availability of the profile
        self.types = frozenset(content_types)
        self.bucket = LoadBucket()

    def serves(self, capabilities: tuple[str, ...], content_type: str | None) -> bool:
        if self.key[0] not in capabilities:
            return False
        return content_type is None or not self.types or content_type in self.types


class _Worker:
    __slots__ = ("avail", "holds", "key", "profile")

    def __init__(self, avail: Availability, profile: _Profile) -> None:
        self.avail = avail
        self.profile = profile
        self.holds: list[float] | None = None  # hold expiry times, oldest first; None: none
        self.key: LoadKey | None = None

    def free(self) -> int:
        a = self.avail
        return a.max_concurrent_tasks - a.active_tasks - (len(self.holds) if self.holds else 0)

    def load(self) -> LoadKey | None:
        """Where the worker sits now, or None when it cannot take a job."""
        free = self.free()
        if not self.avail.available or free <= 0:
            return None
        busy = self.avail.max_concurrent_tasks - free
        return (busy / self.avail.max_concurrent_tasks, -free)


class AvailabilityIndex:
    """The in-memory picture a router decides on. Pure: no NATS, clock passed in.

    Workers are grouped by profile (capability, content types); a fleet has a
    handful of profiles, however many workers. pick() looks at the best load
    level of each profile that can take the job (the list of those profiles
    is cached per request), so its cost does not depend on the fleet's size.
    Availability values taken in are shared, not copied: treat them (and
    their content-type lists) as read-only.
    """

    def __init__(self, rng: random.Random | None = None, hold_s: float = 10.0) -> None:
        self.rng = rng or random.Random()
        self.hold_s = hold_s
        self.workers: dict[str, _Worker] = {}
        self._profiles: dict[tuple[str, tuple[str, ...]], _Profile] = {}
        self._serving: dict[tuple[str | None, str | None], list[LoadBucket]] = {}
        self._strings: dict[str, str] = {}
        self._expiry: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self.workers)

    def update(self, avail: Availability) -> bool:
        """Take a worker's new availability; its held slots are now in its own count."""
        w = self.workers.get(avail.worker_id)
        if w is not None and avail.event_seq < w.avail.event_seq:
            return False
        profile = self._profile_of(avail)
        avail = msgspec.structs.replace(
            avail, supported_content_types=profile.content_types, reason=self._shared(avail.reason)
        )  # fmt: skip
        if w is None:
            w = self.workers[avail.worker_id] = _Worker(avail, profile)
            profile.workers += 1
        self._unplace(w)
        if w.profile is not profile:
            self._leave(w.profile)
            profile.workers += 1
        w.avail = avail
        w.profile = profile
        w.holds = None
        self._place(w)
        return True

    def remove(self, worker_id: str, event_seq: int) -> bool:
        """Forget a worker (its record was purged as of `event_seq`); a newer update
        than that keeps it. True if it was known and is now gone."""
        w = self.workers.get(worker_id)
        if w is None or event_seq < w.avail.event_seq:
            return False
        self._unplace(w)
        self._leave(w.profile)
        del self.workers[worker_id]
        return True

    def get(self, worker_id: str) -> Availability | None:
        w = self.workers.get(worker_id)
        return w.avail if w else None

    def pick(
        self, capability: str | None = None, content_type: str | None = None, now: float = 0.0
    ) -> Availability | None:
        """The least loaded worker that can take the job (random among equals); holds a slot."""
        if self._expiry and self._expiry[0][0] <= now:
            self.expire(now)
        wid = self._choose(self._candidates(capability, content_type))
        if wid is None:
            return None
        w = self.workers[wid]
        self._hold(w, now)
        return w.avail

    def available(
        self, capability: str | None = None, content_type: str | None = None, now: float = 0.0
    ) -> list[Availability]:
        """Everyone who could take the job now, least loaded first."""
        self.expire(now)
        found = [kw for b in self._candidates(capability, content_type) for kw in b.ordered()]
        return [self.workers[wid].avail for _, wid in sorted(found)]

    def release(self, worker_id: str) -> bool:
        """Give back the most recent slot this router holds on the worker."""
        w = self.workers.get(worker_id)
        if w is None or not w.holds:
            return False
        self._unplace(w)
        w.holds.pop()
        self._place(w)
        return True

    def held(self, worker_id: str) -> int:
        w = self.workers.get(worker_id)
        return len(w.holds) if w and w.holds else 0

    def expire(self, now: float) -> None:
        """Drop holds older than hold_s (the worker never reported them)."""
        while self._expiry and self._expiry[0][0] <= now:
            _, wid = heapq.heappop(self._expiry)
            w = self.workers.get(wid)  # None: forgotten since
            if w is not None and w.holds and w.holds[0] <= now:
                self._unplace(w)
                del w.holds[0]
                self._place(w)

    # ------------------------------------------------------------ internals

    def _hold(self, w: _Worker, now: float) -> None:
        self._unplace(w)
        until = now + self.hold_s
        if w.holds is None:
            w.holds = [until]
        else:
            w.holds.append(until)
        heapq.heappush(self._expiry, (until, w.avail.worker_id))
        self._place(w)

    def _place(self, w: _Worker) -> None:
        w.key = w.load()
        if w.key is not None:
            w.profile.bucket.add(w.avail.worker_id, w.key)

    def _unplace(self, w: _Worker) -> None:
        if w.key is not None:
            w.profile.bucket.remove(w.avail.worker_id, w.key)
        w.key = None

    def _shared(self, s: str) -> str:
        """One copy of each distinct short string (reasons repeat across the fleet)."""
        if len(self._strings) > 10_000:
            self._strings.clear()
        return self._strings.setdefault(s, s)

    def _profile_of(self, a: Availability) -> _Profile:
        key = (str(a.capability), tuple(a.supported_content_types))
        profile = self._profiles.get(key)
        if profile is None:
            types = [self._shared(t) for t in a.supported_content_types]
            profile = self._profiles[key] = _Profile(key, types)
            self._serving.clear()  # a new profile may serve cached requests
        return profile

    def _leave(self, profile: _Profile) -> None:
        """A worker left `profile`; the last one out removes it from every request."""
        profile.workers -= 1
        if profile.workers == 0 and self._profiles.get(profile.key) is profile:
            del self._profiles[profile.key]
            self._serving.clear()

    def _candidates(self, capability: str | None, content_type: str | None) -> list[LoadBucket]:
        buckets = self._serving.get((capability, content_type))
        if buckets is None:
            caps = _SERVED_BY.get(capability) if capability else _ALL_CAPABILITIES
            if caps is None:
                raise ValueError(f"unknown capability {capability!r}: use cpu, gpu or hybrid")
            buckets = [p.bucket for p in self._profiles.values() if p.serves(caps, content_type)]
            if len(self._serving) > 10_000:  # content types are the callers' strings
                self._serving.clear()
            self._serving[(capability, content_type)] = buckets
        return buckets

    def _choose(self, buckets: list[LoadBucket]) -> str | None:
        """Uniformly at random among the least loaded workers of these (disjoint) buckets."""
        best: LoadKey | None = None
        levels: list[_Level] = []
        for b in buckets:
            if not b.keys:
                continue
            key = b.keys[0]
            if best is None or key < best:
                best, levels = key, [b.levels[key]]
            elif key == best:
                levels.append(b.levels[key])
        if best is None:
            return None
        if len(levels) == 1:
            ids = levels[0].ids
            return ids[self.rng.randrange(len(ids))]
        n = self.rng.randrange(sum(len(level.ids) for level in levels))
        for level in levels:
            if n < len(level.ids):
                return level.ids[n]
            n -= len(level.ids)
        raise AssertionError("unreachable")


