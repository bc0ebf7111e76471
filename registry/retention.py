"""Retention: which offline records are due for purging, and which purge markers are gone. PURE.

An offline record stays in the bucket for the retention period, then the
projector purges it: a purge marker with a TTL replaces it in the bucket and a
last availability message (reason `purged`, with the same TTL) tells routers to
forget the worker; when the TTL runs out the server removes both, and nothing
of the worker is left but its history in WORKER_EVENTS.

`OfflineSince` finds the records past retention without scanning the fleet;
`Markers` remembers the revision of each marker while it lasts (a worker that
comes back writes over it by compare-and-set on that revision) and forgets it
once the server has removed it. All times are the server's clock (stored
times), as float seconds since the epoch. No I/O, no clock of its own.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

MARKER_SLACK_S = 2.0  # the server removes an expired message a little after its TTL
COMPACT_ABOVE = 4096  # entries at the peak before a table is worth copying smaller


def shrunk(size: int, peak: int) -> bool:
    """A table of `size` entries that held `peak` is worth copying at its size (a dict
    keeps the size of its peak until it is copied)."""
    return peak >= COMPACT_ABOVE and 4 * size <= peak


@dataclass(slots=True)
class OfflineSince:
    """Offline workers by the stored time they went offline, oldest first.

    A heap with lazy invalidation: a worker that comes back (or goes offline
    again later) leaves a stale item, dropped when it reaches the top."""

    _heap: list[tuple[float, str]] = field(default_factory=list)
    _since: dict[str, float] = field(default_factory=dict)
    _peak: int = 0

    def set(self, worker_id: str, offline_at: float) -> None:
        if self._since.get(worker_id) == offline_at:
            return
        self._since[worker_id] = offline_at
        self._peak = max(self._peak, len(self._since))
        heapq.heappush(self._heap, (offline_at, worker_id))
        if len(self._heap) > 2 * len(self._since) + 1024:
            self._heap = [(at, wid) for wid, at in self._since.items()]
            heapq.heapify(self._heap)

    def discard(self, worker_id: str) -> None:
        self._since.pop(worker_id, None)

    def due(self, cutoff: float, most: int) -> list[str]:
        """Up to `most` workers offline since before `cutoff`, oldest first; they are
        no longer tracked (set them again if they are not purged after all)."""
        out: list[str] = []
        heap = self._heap
        while heap and len(out) < most and heap[0][0] < cutoff:
            at, wid = heapq.heappop(heap)
            if self._since.get(wid) == at:
                del self._since[wid]
                out.append(wid)
        if shrunk(len(self._since), self._peak):
            self.compact()
        return out

    def __len__(self) -> int:
        return len(self._since)

    def compact(self) -> None:
        """Tables at the size of what is left."""
        self._since = dict(self._since)
        self._heap = [(at, wid) for wid, at in self._since.items()]
        heapq.heapify(self._heap)
        self._peak = len(self._since)


@dataclass(slots=True)
class Markers:
    """The bucket's delete and purge markers: their revisions while they last.

    A marker with a TTL is forgotten once the server has removed it (its key
    holds nothing then: a write expects revision 0). One without (written by an
    older version, or by `nats kv del`) stays until it is purged again with a
    TTL: `legacy()` lists those."""

    revisions: dict[str, int] = field(default_factory=dict)
    _expiry: list[tuple[float, str, int]] = field(default_factory=list)
    _legacy: list[tuple[str, int]] = field(default_factory=list)
    _peak: int = 0

    def add(self, worker_id: str, revision: int, expires_at: float | None) -> None:
        """A marker at `revision`; `expires_at` None: it has no TTL."""
        self.revisions[worker_id] = revision
        self._peak = max(self._peak, len(self.revisions))
        if expires_at is None:
            self._legacy.append((worker_id, revision))
        else:
            heapq.heappush(self._expiry, (expires_at + MARKER_SLACK_S, worker_id, revision))

    def pop(self, worker_id: str) -> int:
        """The key is written again: the revision a write must expect (0: nothing there)."""
        return self.revisions.pop(worker_id, 0)

    def expire(self, now: float) -> int:
        """Forget the markers the server has removed by `now`; how many."""
        gone = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, wid, revision = heapq.heappop(self._expiry)
            if self.revisions.get(wid) == revision:
                del self.revisions[wid]
                gone += 1
        if shrunk(len(self.revisions), self._peak):
            self.compact()
        return gone

    def legacy(self, most: int) -> list[str]:
        """Up to `most` markers without a TTL (each listed once): to purge again with one."""
        out: list[str] = []
        while self._legacy and len(out) < most:
            wid, revision = self._legacy.pop()
            if self.revisions.get(wid) == revision:
                out.append(wid)
        return out

    def __len__(self) -> int:
        return len(self.revisions)

    def compact(self) -> None:
        """Tables at the size of what is left."""
        self.revisions = dict(self.revisions)
        self._expiry = [x for x in self._expiry if self.revisions.get(x[1]) == x[2]]
        heapq.heapify(self._expiry)
        self._peak = len(self.revisions)


def loaded_markers(revisions: dict[str, int], expiring: dict[str, float]) -> Markers:
    """Markers as the bucket holds them: `expiring` gives the TTL'd ones' expiry."""
    markers = Markers()
    for wid, revision in revisions.items():
        markers.add(wid, revision, expiring.get(wid))
    return markers


def offline_of(records: Iterable[tuple[str, float | None]]) -> OfflineSince:
    """(worker id, offline_at or None) of every record -> the offline ones, indexed."""
    index = OfflineSince()
    for wid, at in records:
        if at is not None:
            index.set(wid, at)
    return index
