"""Every body the simulator sends is the wire contract's own encoding of what it meant.

The simulator writes heartbeats by hand for speed (agent/simulate/wire.py).
These tests hold every body it publishes to registry/protocol.py: it decodes
with the registry's decoder, the contract encodes the decoded event back to
the same bytes, and the event carries the values the simulator meant to send.
No NATS: a publisher that checks each body as it is sent stands in.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from agent.simulate import ALIVE, Fleet, SimSettings, SimWorker, profiles, sent_at_now
from agent.simulate.wire import Metrics, heartbeat_body, heartbeat_prefix
from registry.protocol import (
    MAX_ACTIVE_TASKS,
    MAX_GIB,
    MAX_TASK_COUNT,
    Event,
    HeartbeatEvent,
    RegisterEvent,
    UnregisterEvent,
    WorkerMetrics,
    WorkerStatus,
    decode_event,
    encode,
    new_incarnation,
)

MAX_COUNT = MAX_TASK_COUNT  # the contract's largest count of tasks done


def _decoded(subject: str, body: bytes) -> Event:
    """The registry's reading of a body, which the contract must write back unchanged."""
    event = decode_event(subject, body)
    assert encode(event) == body, f"{subject}: the contract encodes it as {encode(event)!r}"
    return event


def _meant(metrics: Metrics) -> WorkerMetrics:
    """The metrics the simulator means by its tuple (see agent.simulate.wire.Metrics)."""
    cpu, memory, gpu, active, completed, failed, avg_s, gpu_memory = metrics
    return WorkerMetrics(
        cpu_usage_percent=cpu, memory_usage_percent=memory, gpu_usage_percent=gpu,
        active_tasks=active, completed_tasks=completed, failed_tasks=failed,
        avg_task_duration_seconds=avg_s, gpu_memory_used_gb=gpu_memory,
    )  # fmt: skip


def _assert_recent(sent_at: datetime) -> None:
    assert sent_at.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - sent_at) < timedelta(seconds=60)


# ---------------------------------------------------------------- heartbeats


def _heartbeat(w: SimWorker, noise: float) -> HeartbeatEvent:
    """Check one beat of `w` against what it meant to send; the decoded event."""
    meant = _meant(w.metrics(noise))
    event = _decoded(w.subject, w.heartbeat_body(sent_at_now(), noise))
    assert isinstance(event, HeartbeatEvent)
    assert (event.worker_id, event.incarnation) == (w.worker_id, w.incarnation)
    assert event.status is WorkerStatus.ONLINE  # the only status the simulator sends
    assert event.metrics == meant
    _assert_recent(event.sent_at)
    return event


def _workers(seed: int) -> list[SimWorker]:
    """One worker of every machine kind a fleet with this seed can have."""
    rng = random.Random(seed)
    return [SimWorker(i, f"sim-{seed}-{i:03d}", p, rng) for i, p in enumerate(profiles(rng))]


@pytest.mark.parametrize("seed", range(10))
def test_heartbeats_at_every_load_are_the_contracts_encoding(seed: int) -> None:
    rng = random.Random(seed)
    for w in _workers(seed):
        for active in sorted({0, 1, rng.randint(0, w.max_tasks), w.max_tasks}):
            for completed in (0, 1, rng.randint(2, 10**6), MAX_COUNT):
                w.active, w.completed, w.failed = active, completed, rng.choice((0, completed))
                for noise in (-1000.0, -4.0, 0.0, rng.uniform(-4.0, 4.0), 4.0, 1000.0):
                    _heartbeat(w, noise)


def test_heartbeats_reach_0_and_100_percent_and_every_tenth_between() -> None:
    w = next(w for w in _workers(1) if w.hardware.gpu_count)
    w.cpu = w.mem = 0.0  # idle: the usage is the noise (memory half of it), clamped
    seen = [_heartbeat(w, tenth / 10).metrics for tenth in range(-20, 1021)]
    for usage in ("cpu_usage_percent", "gpu_usage_percent"):
        assert {getattr(m, usage) for m in seen} == {tenth / 10 for tenth in range(1001)}
    assert {m.memory_usage_percent for m in seen} >= {0.0, 0.1, 50.0, 51.0}


def test_hand_picked_metrics_are_the_contracts_encoding() -> None:
    incarnation = new_incarnation()
    prefix = heartbeat_prefix("w_2-B", incarnation)
    edges: list[Metrics] = [
        (0.0, 0.0, 0.0, 0, 0, 0, 0.0, 0.0),
        (100.0, 100.0, 100.0, MAX_ACTIVE_TASKS, MAX_COUNT, MAX_COUNT, 1e9, MAX_GIB),
        (0.1, 99.9, 33.3, 1, 2, 3, 0.001, 0.01),
        (12.5, 7.0, 0.0, 4, 123456, 7, 7.389, 509.76),
    ]
    for metrics in edges:
        event = _decoded("worker.heartbeat.w_2-B", heartbeat_body(prefix, sent_at_now(), metrics))
        assert isinstance(event, HeartbeatEvent)
        assert (event.incarnation, event.metrics) == (incarnation, _meant(metrics))


# ---------------------------------------------------------------- a whole fleet


class ContractCheck:
    """The fleet's publisher: holds each body to the contract as it is sent."""

    acked = errors = timeouts = duplicates = retried = in_flight = 0
    last_error = ""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.fleet = Fleet(settings, self)
        self.kinds: Counter[str] = Counter()
        self.statuses: set[WorkerStatus] = set()
        self.reasons: set[str] = set()
        self.loads: set[str] = set()  # "idle", "full": the edges of active_tasks seen

    async def publish(self, subject: str, body: bytes) -> None:
        event = _decoded(subject, body)
        w = self.fleet.by_id[event.worker_id]
        match event:
            case HeartbeatEvent(status=status, metrics=m):
                counts = (m.active_tasks, m.completed_tasks, m.failed_tasks)
                assert counts == (w.active, w.completed, w.failed)
                self.statuses.add(status)
                self.loads |= {"idle"} if w.active == 0 else set()
                self.loads |= {"full"} if w.active == w.max_tasks else set()
            case RegisterEvent():
                assert event.registration == w.registration()
                assert event.heartbeat_interval_s == self.settings.heartbeat_interval_s
            case UnregisterEvent(reason=reason):
                self.reasons.add(reason)
            case _:
                pytest.fail(f"the simulator sent {event!r}")
        assert event.incarnation == w.incarnation
        _assert_recent(event.sent_at)
        self.kinds[subject.split(".")[1]] += 1

    async def settle(self, timeout_s: float) -> None:
        pass


@pytest.mark.parametrize("seed", range(4))
async def test_every_body_a_churning_fleet_sends_is_the_contracts_encoding(seed: int) -> None:
    settings = SimSettings(count=200, heartbeat_interval_s=1.0, churn=0.5, kill=5, seed=seed)
    check = ContractCheck(settings)
    fleet = check.fleet
    await fleet.register_all(0.0)
    for tick in range(1, 601):  # 30 s
        if tick % 100 == 0:  # asked to register again (same incarnation)
            fleet.on_control(fleet.workers[tick // 100].worker_id, b'{"v":1,"action":"register"}')
        await fleet.step(tick * 0.05)
    for w in fleet.workers[:20]:
        if w.state == ALIVE:
            await fleet.heartbeat(w)  # a beat outside the schedule (the benchmarks preload so)
    await fleet.leave()
    assert set(check.kinds) == {"register", "heartbeat", "unregister"}
    assert check.statuses == {WorkerStatus.ONLINE}
    assert check.reasons == {"restart", "simulation ended"}
    assert check.loads == {"idle", "full"}
    assert fleet.report.controls > 0
