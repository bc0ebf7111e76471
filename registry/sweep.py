"""Who is overdue: PURE functions of last-seen times, timeouts and `now`.

All times are the server's clock (JetStream's stored timestamps), as float
seconds since the epoch; the registry host's wall clock never enters here.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import NamedTuple


def timeout_s(heartbeat_interval_s: float, floor_s: float, factor: float = 3.0) -> float:
    """A worker is silent after missing `factor` of its declared intervals."""
    return max(floor_s, factor * heartbeat_interval_s)


def deadline(last_heartbeat: float, timeout: float, grace_until: float) -> float:
    """When a worker becomes overdue; never before the sweeper's grace ends."""
    return max(last_heartbeat + timeout, grace_until)


def brake_engaged(silent: int, live: int, recent: int, fraction: float, min_fleet: int) -> bool:
    """Mass-expiry brake: more than `fraction` of the fleet dying at once is suspect.

    `silent` workers are overdue or past their late deadline, among `live`
    tracked ones; `recent` were expired within the brake window. Past the
    fraction, the registry suspects itself (or the network) before it declares
    a fleet dead.
    """
    fleet = live + recent
    return fleet >= min_fleet and silent + recent > fraction * fleet


class Due(NamedTuple):
    """A deadline that fell due: what pop_due() returns."""

    at: float
    worker_id: str
    last_heartbeat: float


_Item = tuple[float, str, float]
"""(at, worker_id, last_heartbeat) as the heap holds it: an exact tuple of
atoms, which CPython stops tracking in the GC after its first pass (a
NamedTuple, being a subclass, would stay tracked: 4 per worker at 100,000
workers made every full collection walk 400,000 more objects)."""


@dataclass(slots=True)
class DeadlineHeap:
    """Deadlines with lazy invalidation: stale entries are dropped when popped."""

    _heap: list[_Item] = field(default_factory=list)
    _current: dict[str, float] = field(default_factory=dict)

    def set(self, worker_id: str, last_heartbeat: float, at: float) -> None:
        self._current[worker_id] = last_heartbeat
        heapq.heappush(self._heap, (at, worker_id, last_heartbeat))
        if len(self._heap) > 2 * len(self._current) + 1024:
            self._compact()

    def discard(self, worker_id: str) -> None:
        self._current.pop(worker_id, None)

    def pending(self, worker_id: str) -> float | None:
        """The last heartbeat of the worker's pending deadline; None if it has none."""
        return self._current.get(worker_id)

    def at(self, worker_id: str) -> float | None:
        """When the worker's pending deadline falls due (a scan: for diagnostics)."""
        last = self._current.get(worker_id)
        if last is None:
            return None
        return min(at for at, wid, lh in self._heap if wid == worker_id and lh == last)

    def next_at(self) -> float | None:
        while self._heap and not self._valid(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Due]:
        due: list[Due] = []
        while (at := self.next_at()) is not None and at <= now:
            item = heapq.heappop(self._heap)
            self._current.pop(item[1], None)
            due.append(Due(*item))
        return due

    def __len__(self) -> int:
        return len(self._current)

    def _valid(self, item: _Item) -> bool:
        return self._current.get(item[1]) == item[2]

    def _compact(self) -> None:
        latest: dict[str, _Item] = {}
        for item in self._heap:
            if self._valid(item) and (item[1] not in latest or item[0] > latest[item[1]][0]):
                latest[item[1]] = item
        self._heap = list(latest.values())
        heapq.heapify(self._heap)


@dataclass(slots=True)
class ServerClock:
    """The server's clock, estimated from its timestamps plus local monotonic time.

    Every stored timestamp the registry sees moves the estimate forward; an API
    `ts` (the server's time when it answered) moves it either way (`step`);
    between them it advances with the monotonic clock, so a jump of the registry
    host's wall clock changes nothing.
    """

    _server: float = 0.0
    _mono: float = 0.0

    def observe(self, server_ts: float, mono_now: float) -> None:
        if server_ts > self.now(mono_now):
            self._server, self._mono = server_ts, mono_now

    def step(self, server_now: float, mono_now: float, tolerance_s: float = 0.5) -> float:
        """A reading of the server's clock *now* (the `ts` of an API answer), which may
        also move the estimate back: after a stream leader change, stored times come
        from another node, whose clock can be behind. Kept ahead, the estimate would
        judge workers early by the difference. Returns how far it stepped back (0.0:
        not at all); a reading behind by less than `tolerance_s` is taken as the
        answer's latency and changes nothing."""
        behind = self.now(mono_now) - server_now if self._mono else 0.0
        if behind > tolerance_s:
            self._server, self._mono = server_now, mono_now
            return behind
        self.observe(server_now, mono_now)
        return 0.0

    def now(self, mono_now: float) -> float:
        return self._server + (mono_now - self._mono) if self._mono else self._server

    def mono_at(self, server_ts: float, mono_now: float) -> float:
        """The monotonic time at which the server clock will read `server_ts`."""
        return mono_now + (server_ts - self.now(mono_now))
