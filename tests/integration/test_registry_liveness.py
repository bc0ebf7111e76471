"""Flap-safe liveness: a late worker is unavailable before it expires, and a
mass expiry is held while the registry suspects itself."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from registry.eventlog import EventQuery, read_events
from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    Beater,
    bounded,
    expired_events,
    heartbeat_body,
    last_availability,
    new_incarnation,
    publish,
    record,
    register_body,
    registry_cli,
    running_registry,
)

INTERVAL = 0.4


async def _register(js: JetStreamContext, workers: dict[str, str]) -> None:
    for wid, inc in workers.items():
        await publish(js, "register", wid, register_body(wid, inc, heartbeat_interval_s=INTERVAL))


async def _availability(js: JetStreamContext, wid: str, reason: str) -> dict[str, Any] | None:
    avail = await last_availability(js, wid)
    return avail if avail["reason"] == reason else None


@bounded(20)
async def test_late_worker_is_announced_unavailable_before_it_expires(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, timeout_floor_s=0.1, caught_up=True):
        await _register(js, {"w-late": inc})
        last = await publish(js, "heartbeat", "w-late", heartbeat_body("w-late", inc))
        late = await eventually(lambda: _availability(js, "w-late", "late"), timeout=3)
        rec = await record(js, "w-late")
        assert rec is not None and rec["late"] and rec["offline_reason"] is None
        assert late["available"] is False and late["event_seq"] > last.seq
        await eventually(lambda: _availability(js, "w-late", "expired"), timeout=3)


@bounded(20)
async def test_late_worker_is_available_again_on_its_next_beat(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, timeout_floor_s=5.0, caught_up=True):
        await _register(js, {"w-slow": inc})
        await publish(js, "heartbeat", "w-slow", heartbeat_body("w-slow", inc))
        await eventually(lambda: _availability(js, "w-slow", "late"), timeout=3)
        beat = await publish(js, "heartbeat", "w-slow", heartbeat_body("w-slow", inc))
        back = await eventually(lambda: _availability(js, "w-slow", "ok"), timeout=3)
    assert back["available"] is True and back["event_seq"] == beat.seq
    rec = await record(js, "w-slow")
    assert rec is not None and not rec["late"] and rec["available"]


@bounded(30)
async def test_punctual_workers_are_never_late(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    workers = {f"w{i}": new_incarnation() for i in range(5)}
    async with running_registry(nats_server.url, timeout_floor_s=0.1, caught_up=True) as reg:
        await _register(js, workers)
        async with Beater(js, workers, interval_s=INTERVAL / 2) as beater:
            await beater.until(rounds=10)
        assert reg.counters()["lates_published"] == 0


@bounded(30)
async def test_mass_expiry_is_held_and_released_when_the_fleet_beats_again(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    steady = {f"s{i}": new_incarnation() for i in range(4)}
    silent = {f"q{i}": new_incarnation() for i in range(8)}
    settings = {"timeout_floor_s": 0.1, "brake_min_fleet": 10, "caught_up": True,
                "brake_hold_s": 30.0}  # fmt: skip
    with capture_logs() as logs:
        async with running_registry(nats_server.url, **settings) as reg:  # type: ignore[arg-type]
            await _register(js, {**steady, **silent})
            async with Beater(js, steady, interval_s=INTERVAL / 2) as beater:
                await eventually(lambda: reg.counters()["brake_engaged"] == 1, timeout=5)
                await beater.until(rounds=8)  # well past the silent workers' timeout
                assert await expired_events(js) == 0
                async with Beater(js, silent, interval_s=INTERVAL / 2):
                    await eventually(lambda: reg.counters()["brake_engaged"] == 0, timeout=5)
    assert await expired_events(js) == 0
    assert any(e["event"] == "mass_expiry_held" and e["log_level"] == "error" for e in logs)


@bounded(30)
async def test_a_few_deaths_in_a_large_fleet_expire_normally(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    steady = {f"s{i}": new_incarnation() for i in range(10)}
    dead = {"d0": new_incarnation(), "d1": new_incarnation()}
    settings = {"timeout_floor_s": 0.1, "brake_min_fleet": 10, "caught_up": True}
    async with running_registry(nats_server.url, **settings) as reg:  # type: ignore[arg-type]
        await _register(js, {**steady, **dead})
        async with Beater(js, steady, interval_s=INTERVAL / 2):
            await eventually(lambda: reg.counters()["expiries_published"] == 2, timeout=5)
        assert reg.counters()["brake_engaged"] == 0


async def _expiry_times(nc: Client) -> list[float]:
    """Stored times of every worker.expired.* event, oldest first."""
    events = await read_events(nc, EventQuery(kind="expired", limit=1000))
    return sorted(e.time.timestamp() for e in events)


@bounded(90)
async def test_a_fleet_that_dies_for_good_is_held_then_expired_at_the_stated_rate(
    nats_server: NatsServer, nc: Client
) -> None:
    """60% of the fleet dies for good: no expiry during the hold, then one at a time at
    the configured rate; the living are never expired."""
    js = nc.jetstream()
    steady = {f"s{i}": new_incarnation() for i in range(8)}
    dead = {f"d{i:02}": new_incarnation() for i in range(12)}
    hold_s, rate = 3.0, 4.0
    settings = {"timeout_floor_s": 0.1, "brake_min_fleet": 10, "caught_up": True,
                "brake_hold_s": hold_s, "brake_release_per_s": rate}  # fmt: skip
    async with running_registry(nats_server.url, **settings) as reg:  # type: ignore[arg-type]
        await _register(js, {**steady, **dead})
        async with Beater(js, steady, interval_s=INTERVAL / 2):
            await eventually(lambda: reg.sweeper.held_since is not None, timeout=10)
            held_since = reg.sweeper.held_since
            assert held_since is not None
            code, out, _ = await registry_cli(nats_server.url, "brake", "status")
            assert code == 0 and out.startswith("holding: ")
            await eventually(lambda: reg.counters()["expiries_published"] >= len(dead), timeout=40)
            await asyncio.sleep(1.0)
            assert await expired_events(js) == len(dead)  # and none of the living
    times = await _expiry_times(nc)
    assert len(times) == len(dead)
    assert times[0] >= held_since + hold_s - 0.3  # nothing during the hold (clock slack)
    burst = max(rate, 1.0)  # the rate's bucket holds at most this many
    for i, t in enumerate(times):  # never faster than the rate
        assert t - times[0] >= (i - burst) / rate - 0.05, (i, t - times[0])
    for wid in steady:
        rec = await record(js, wid)
        assert rec is not None and rec["offline_reason"] is None


@bounded(60)
async def test_an_operator_releases_the_brake_and_the_silent_expire_at_once(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    steady = {f"s{i}": new_incarnation() for i in range(4)}
    silent = {f"q{i}": new_incarnation() for i in range(8)}
    settings = {"timeout_floor_s": 0.1, "brake_min_fleet": 10, "caught_up": True,
                "brake_hold_s": 600.0}  # fmt: skip
    with capture_logs() as logs:
        async with running_registry(nats_server.url, **settings) as reg:  # type: ignore[arg-type]
            await _register(js, {**steady, **silent})
            async with Beater(js, steady, interval_s=INTERVAL / 2):
                await eventually(lambda: reg.counters()["brake_engaged"] == 1, timeout=10)
                await eventually(lambda: reg.counters()["expiries_held"] == len(silent), timeout=10)
                assert await expired_events(js) == 0
                code, out, err = await registry_cli(
                    nats_server.url, "brake", "release", "--reason", "zone lost", "--by", "dana"
                )
                assert code == 0, err
                assert out.startswith(f"released: {len(silent)} held expiries")
                await eventually(lambda: reg.counters()["expiries_published"] == len(silent),
                                 timeout=10)  # fmt: skip
                assert reg.counters()["brake_engaged"] == 0
                code, out, _ = await registry_cli(nats_server.url, "brake")
                assert code == 0 and out.startswith("off:")
    assert await expired_events(js) == len(silent)
    released = [e for e in logs if e["event"] == "brake_released_by_operator"]
    assert released and released[0]["by"] == "dana" and released[0]["reason"] == "zone lost"

