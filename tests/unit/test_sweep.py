"""Pure sweeping: timeouts, deadlines, the heap and the server clock (no sleeping)."""

from __future__ import annotations

import gc

from registry.server.store import Entry
from registry.sweep import DeadlineHeap, ServerClock, brake_engaged, deadline, timeout_s
from tests.factories import make_info


def test_timeout_is_three_intervals_with_a_floor() -> None:
    assert timeout_s(5.0, floor_s=1.0) == 15.0
    assert timeout_s(0.1, floor_s=1.0) == 1.0
    assert timeout_s(2.0, floor_s=1.0, factor=4.0) == 8.0


def test_deadline_never_before_grace() -> None:
    assert deadline(100.0, 15.0, grace_until=0.0) == 115.0
    assert deadline(100.0, 15.0, grace_until=200.0) == 200.0


def test_brake_engages_when_more_than_half_the_fleet_would_expire_at_once() -> None:
    assert not brake_engaged(silent=5, live=100, recent=0, fraction=0.5, min_fleet=10)
    assert brake_engaged(silent=51, live=100, recent=0, fraction=0.5, min_fleet=10)
    # deaths spread over the window count together
    assert brake_engaged(silent=20, live=60, recent=40, fraction=0.5, min_fleet=10)
    # a fleet smaller than min_fleet is never braked; fraction 1 disables the brake
    assert not brake_engaged(silent=3, live=3, recent=0, fraction=0.5, min_fleet=10)
    assert not brake_engaged(silent=100, live=100, recent=0, fraction=1.0, min_fleet=10)


def test_heap_pops_only_what_is_due_in_order() -> None:
    heap = DeadlineHeap()
    heap.set("a", 1.0, 10.0)
    heap.set("b", 2.0, 5.0)
    heap.set("c", 3.0, 20.0)
    assert heap.next_at() == 5.0
    assert [d.worker_id for d in heap.pop_due(12.0)] == ["b", "a"]
    assert heap.next_at() == 20.0 and len(heap) == 1


def test_rearming_invalidates_the_old_deadline() -> None:
    heap = DeadlineHeap()
    heap.set("a", 1.0, 10.0)
    heap.set("a", 8.0, 17.0)
    assert heap.pop_due(12.0) == []
    (due,) = heap.pop_due(17.0)
    assert due.last_heartbeat == 8.0


def test_discarded_workers_are_never_due() -> None:
    heap = DeadlineHeap()
    heap.set("a", 1.0, 10.0)
    heap.discard("a")
    assert heap.pop_due(100.0) == [] and heap.next_at() is None


def test_heap_stays_bounded_under_many_rearms() -> None:
    heap = DeadlineHeap()
    for i in range(100_000):
        heap.set(f"w{i % 10}", float(i), float(i) + 15.0)
    assert len(heap._heap) <= 2 * 10 + 1024 + 1
    assert len(heap.pop_due(1e9)) == 10


def test_clock_follows_server_timestamps_not_the_local_wall_clock() -> None:
    clock = ServerClock()
    clock.observe(1000.0, mono_now=50.0)
    assert clock.now(52.5) == 1002.5
    clock.observe(1001.0, mono_now=53.0)  # older than the estimate: ignored
    assert clock.now(53.0) == 1003.0
    clock.observe(1010.0, mono_now=54.0)  # server is ahead: jump forward
    assert clock.now(55.0) == 1011.0


def test_a_reading_of_the_servers_now_steps_the_clock_back_after_a_leader_change() -> None:
    clock = ServerClock()
    clock.observe(1000.0, mono_now=50.0)  # stored by a leader whose clock is 5 s ahead
    assert clock.step(996.0, mono_now=51.0) == 5.0  # the new leader answers: 996 now
    assert clock.now(52.0) == 997.0
    assert clock.mono_at(1000.0, mono_now=52.0) == 55.0  # a deadline at 1000 is 3 s away
    assert clock.step(996.8, mono_now=52.0) == 0.0  # behind by 0.2 s: latency, ignored
    assert clock.now(52.0) == 997.0
    assert clock.step(999.0, mono_now=52.0) == 0.0  # ahead: forward, as observe()
    assert clock.now(52.0) == 999.0


def test_clock_converts_server_deadlines_to_monotonic_time() -> None:
    clock = ServerClock()
    clock.observe(1000.0, mono_now=50.0)
    assert clock.mono_at(1005.0, mono_now=51.0) == 55.0


def test_deadlines_and_entries_add_nothing_to_a_full_collection() -> None:
    """Per-worker state the registry keeps is invisible to the cyclic GC, so a
    full collection's pause does not grow with the fleet."""
    heap = DeadlineHeap()
    for i in range(100):
        heap.set(f"w{i}", float(i), float(i) + 3.0)
    entry = Entry(make_info("w1"), 7)
    gc.collect()
    assert not any(gc.is_tracked(item) for item in heap._heap)
    assert not gc.is_tracked(entry) and not gc.is_tracked(entry.record)
