"""One schedule for the whole fleet: no task, timer or coroutine per worker."""

from __future__ import annotations

from collections.abc import Sequence


class Schedule:
    """Heartbeats of n workers spread evenly over one interval, in a fixed order.

    Beat k (counted from `start`) is due at start + k * interval / n and belongs
    to the worker in slot k mod n. `due(now)` hands out every beat that came due
    since the last call; after a stall longer than an interval each worker
    beats once, not once per missed interval (as a real agent would).
    """

    def __init__(self, order: Sequence[int], interval_s: float, start: float) -> None:
        self.order = list(order)
        self.n = len(self.order)
        self.interval_s = interval_s
        self.start = start
        self.issued = 0

    def due(self, now: float) -> list[int]:
        target = int((now - self.start) * self.n / self.interval_s)
        if target - self.issued > self.n:
            self.issued = target - self.n
        if target <= self.issued:
            return []
        n, order = self.n, self.order
        out = [order[k % n] for k in range(self.issued, target)]
        self.issued = target
        return out

    def lag(self, now: float) -> float:
        """How late the oldest beat not yet handed out is (0 when none is due)."""
        return max(0.0, now - (self.start + (self.issued + 1) * self.interval_s / self.n))
