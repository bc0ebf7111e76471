"""Task tracking: the host counts tasks, the agent's thread reports them.

`TaskStats` is shared between threads (a lock guards it). It calls
`on_slots_changed` whenever a task start or end changes whether the worker has
a free slot (active reaches max, or drops below it), so the agent can tell
routers at once instead of at the next heartbeat tick.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import msgspec

from registry import protocol


@dataclass(frozen=True)
class TaskCounts:
    active: int = 0
    completed: int = 0
    failed: int = 0
    avg_duration_s: float = 0.0  # mean duration of completed tasks


def _nothing() -> None:
    pass


class TaskStats:
    """Counters shared by the host (which counts) and the agent thread (which reports)."""

    def __init__(self, max_tasks: int = 1, on_slots_changed: Callable[[], None] = _nothing) -> None:
        """`on_slots_changed` runs on the counting thread, outside the lock."""
        self._max = max_tasks
        self._on_slots_changed = on_slots_changed
        self._lock = threading.Lock()
        self._active = self._completed = self._failed = 0
        self._completed_s = 0.0

    def started(self) -> None:
        with self._lock:
            self._active += 1
            now_full = self._active == self._max
        if now_full:
            self._on_slots_changed()

    def finished(self, duration_s: float, ok: bool) -> None:
        with self._lock:
            self._active -= 1
            if ok:
                self._completed += 1
                self._completed_s += duration_s
            else:
                self._failed += 1
            slot_freed = self._active == self._max - 1
        if slot_freed:
            self._on_slots_changed()

    def snapshot(self) -> TaskCounts:
        with self._lock:
            avg = self._completed_s / self._completed if self._completed else 0.0
            return TaskCounts(self._active, self._completed, self._failed, avg)

    def apply(self, usage: protocol.WorkerMetrics) -> protocol.WorkerMetrics:
        """The sampled usage with the task counters written in."""
        counts = self.snapshot()
        return msgspec.structs.replace(
            usage,
            active_tasks=counts.active,
            completed_tasks=counts.completed,
            failed_tasks=counts.failed,
            avg_task_duration_seconds=round(counts.avg_duration_s, 3),
        )


class TaskScope:
    """One tracked task, for `with` or `async with`; an exception counts it as failed."""

    def __init__(self, stats: TaskStats) -> None:
        self._stats = stats
        self._started = 0.0

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        self._stats.started()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._stats.finished(time.monotonic() - self._started, ok=exc_type is None)

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.__exit__(exc_type)
