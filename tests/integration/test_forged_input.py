"""On an open server (no NATS permissions) the registry defends itself: verdicts
apply only after the silence they claim, and numbers out of the contract's
bounds are rejected. A verdict the fold refuses is judged again, so a really
silent worker still expires."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from registry.eventlog import EventQuery, read_events
from registry.fold import PREMATURE
from registry.ops.explain import replay
from registry.server.app import Registry
from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    expired_body,
    folded,
    heartbeat_body,
    late_body,
    new_incarnation,
    projected,
    publish,
    record,
    register_body,
    running_registry,
)

INTERVAL = 5.0  # the sweeper's own verdicts would come 7.5 s (late) and 15 s (expired) after a beat


async def _beating(js: JetStreamContext, wid: str) -> str:
    """A registered worker that just beat; its last_heartbeat, as anyone reads it in the bucket."""
    inc = new_incarnation()
    await publish(js, "register", wid, register_body(wid, inc, heartbeat_interval_s=INTERVAL))
    beat = await publish(js, "heartbeat", wid, heartbeat_body(wid, inc))
    rec = await eventually(lambda: folded(js, wid, beat.seq))
    last: str = rec["last_heartbeat"]
    return last


async def _explained(js: JetStreamContext, wid: str) -> list[str]:
    events = await read_events(js._nc, EventQuery(worker_id=wid))
    return [line.what for line in replay(events)]


def _untouched(rec: dict[str, Any]) -> bool:
    return rec["offline_reason"] is None and rec["available"] and not rec["late"]


# ---------------------------------------------------------------- forged verdicts


@bounded(20)
async def test_forged_expiry_right_after_a_beat_changes_nothing(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        last = await _beating(js, "w-victim")
        for claimed in (0.01, 3 * INTERVAL):  # a tiny timeout; the registry's own, too early
            ack = await publish(js, "expired", "w-victim", expired_body("w-victim", last, claimed))
        rec = await projected(js, registry, "w-victim", ack.seq)
        explained = await _explained(js, "w-victim")
    assert _untouched(rec)
    assert registry.counters()["events_ignored"] == 2
    assert explained[-2].startswith(f"ignored expired: {PREMATURE} {2 * INTERVAL:g}s")
    assert explained[-1].startswith(f"ignored expired: {PREMATURE} {3 * INTERVAL:g}s: stored")


@bounded(20)
async def test_forged_late_notice_right_after_a_beat_changes_nothing(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        last = await _beating(js, "w-victim")
        for claimed in (0.01, 1.5 * INTERVAL):
            ack = await publish(js, "late", "w-victim", late_body("w-victim", last, claimed))
        rec = await projected(js, registry, "w-victim", ack.seq)
        explained = await _explained(js, "w-victim")
    assert _untouched(rec)
    assert registry.counters()["events_ignored"] == 2
    assert all(line.startswith(f"ignored late: {PREMATURE}") for line in explained[-2:])


# ---------------------------------------------------------------- the sweeper judges again


def _push_clock_ahead(registry: Registry, by_s: float) -> None:
    """The sweeper's estimate of the server's clock runs `by_s` ahead of stored times."""
    mono = time.monotonic()
    registry.clock.observe(registry.clock.now(mono) + by_s, mono)


@bounded(20)
async def test_a_verdict_refused_as_premature_is_judged_again_until_the_worker_expires(
    nats_server: NatsServer, nc: Client
) -> None:
    """Without a second judgement the popped deadline is gone and the worker stays live."""
    js = nc.jetstream()
    interval, timeout = 0.2, 0.6  # late after 0.3 s
    async with running_registry(nats_server.url, timeout_floor_s=0.1, caught_up=True) as registry:
        _push_clock_ahead(registry, 0.4)  # every first verdict comes too early
        with capture_logs() as logs:
            body = register_body("w-silent", new_incarnation(), heartbeat_interval_s=interval)
            await publish(js, "register", "w-silent", body)
            rec = await eventually(lambda: _expired(js, "w-silent"), timeout=5.0)
        explained = await _explained(js, "w-silent")
    silent_s = _seconds(rec["offline_at"]) - _seconds(rec["last_heartbeat"])
    assert silent_s >= timeout
    assert any(line.startswith(f"ignored expired: {PREMATURE}") for line in explained)
    assert any(line.startswith(f"ignored late: {PREMATURE}") for line in explained)
    rejudged = {e["kind"] for e in logs if e["event"] == "verdict_refused_rejudging"}
    assert rejudged == {"late", "expired"}


async def _expired(js: JetStreamContext, wid: str) -> dict[str, Any] | None:
    rec = await record(js, wid)
    return rec if rec is not None and rec["offline_reason"] == "expired" else None


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# ---------------------------------------------------------------- numbers out of bounds


@bounded(20)
async def test_registration_with_absurd_numbers_is_rejected(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        absurd = register_body("w-greedy", inc, capability="hybrid", max_concurrent_tasks=1_000_000)
        ack = await publish(js, "register", "w-greedy", absurd)
        await eventually(lambda: registry.projector.counters.last_seq >= ack.seq)
        assert await record(js, "w-greedy") is None
        ok = await publish(js, "register", "w-greedy", register_body("w-greedy", inc))
        await eventually(lambda: folded(js, "w-greedy", ok.seq))
        again = register_body("w-greedy", inc, heartbeat_interval_s=86400.0)
        ack = await publish(js, "register", "w-greedy", again)
        rec = await projected(js, registry, "w-greedy", ack.seq)
        busy = heartbeat_body("w-greedy", inc, active_tasks=10**9)
        ack = await publish(js, "heartbeat", "w-greedy", busy)
        rec = await projected(js, registry, "w-greedy", ack.seq)
    assert rec["event_seq"] == ok.seq  # neither the second registration nor the beat folded
    assert rec["registration"]["max_concurrent_tasks"] == 2
    assert rec["heartbeat_interval_s"] == 30.0
    assert registry.counters()["events_rejected"] == 3

