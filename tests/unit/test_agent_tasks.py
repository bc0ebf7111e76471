"""Task tracking: started / finished / failed feed the heartbeat's metrics."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent import Agent
from agent.tasks import TaskCounts, TaskStats
from registry.protocol import WorkerMetrics

USAGE = WorkerMetrics(cpu_usage_percent=10.0, memory_usage_percent=20.0)


def agent() -> Agent:
    return Agent("nats://127.0.0.1:1", name="tasks")  # never started: no NATS needed


async def test_a_task_is_active_inside_the_block_and_completed_after() -> None:
    a = agent()
    async with a.task():
        assert a.tasks.active == 1
    assert (a.tasks.active, a.tasks.completed, a.tasks.failed) == (0, 1, 0)


async def test_an_exception_counts_the_task_as_failed_and_propagates() -> None:
    a = agent()
    with pytest.raises(RuntimeError):
        async with a.task():
            raise RuntimeError("transcription failed")
    assert (a.tasks.active, a.tasks.completed, a.tasks.failed) == (0, 0, 1)


async def test_a_cancelled_task_counts_as_failed() -> None:
    a = agent()

    async def job() -> None:
        async with a.task():
            await asyncio.sleep(10)

    running = asyncio.create_task(job())
    await asyncio.sleep(0.01)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert (a.tasks.active, a.tasks.failed) == (0, 1)


def test_plain_with_works_for_threaded_workers() -> None:
    a = agent()

    def work() -> None:
        for _ in range(100):
            with a.task():
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (a.tasks.active, a.tasks.completed) == (0, 400)


def test_average_duration_is_over_completed_tasks() -> None:
    stats = TaskStats()
    for duration, ok in ((1.0, True), (3.0, True), (100.0, False)):
        stats.started()
        stats.finished(duration, ok=ok)
    assert stats.snapshot() == TaskCounts(active=0, completed=2, failed=1, avg_duration_s=2.0)


def test_counters_are_written_into_the_metrics() -> None:
    stats = TaskStats()
    stats.started()
    stats.started()
    stats.finished(0.5, ok=True)
    metrics = stats.apply(USAGE)
    assert (metrics.active_tasks, metrics.completed_tasks, metrics.failed_tasks) == (1, 1, 0)
    assert metrics.avg_task_duration_seconds == 0.5
    assert metrics.cpu_usage_percent == 10.0  # the sampled usage is kept


def test_only_filling_or_freeing_the_last_slot_signals() -> None:
    changes: list[int] = []
    stats = TaskStats(max_tasks=2, on_slots_changed=lambda: changes.append(stats.snapshot().active))
    for _ in range(3):  # 1: a slot left; 2: full; 3: over-full, still full
        stats.started()
    for _ in range(3):  # 2: still full; 1: a slot is free; 0: still free
        stats.finished(0.1, ok=True)
    assert changes == [2, 1]


def test_with_one_slot_every_start_and_end_signals() -> None:
    changes: list[str] = []
    stats = TaskStats(max_tasks=1, on_slots_changed=lambda: changes.append("changed"))
    stats.started()
    stats.finished(0.1, ok=False)
    assert changes == ["changed", "changed"]
