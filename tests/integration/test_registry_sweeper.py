"""The sweeper: silent workers expire on time, judged by JetStream's clock, and an
expiry that a heartbeat overtook changes nothing."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    EVENTS,
    Beater,
    bounded,
    bucket_records,
    expired_body,
    expired_events,
    folded,
    heartbeat_body,
    last_availability,
    new_incarnation,
    publish,
    record,
    register_body,
    rfc3339,
    running_registry,
    stored_time,
)

INTERVAL = 0.3
FLOOR = 0.1
TIMEOUT = max(FLOOR, 3 * INTERVAL)  # 0.9 s
HOUR = 3600.0


async def _expired_record(js: JetStreamContext, wid: str) -> dict[str, Any] | None:
    rec = await record(js, wid)
    return rec if rec is not None and rec["offline_reason"] == "expired" else None


@bounded(20)
async def test_silent_worker_expires_within_timeout_plus_one_second(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, timeout_floor_s=FLOOR, caught_up=True):
        await publish(
            js, "register", "w-quiet", register_body("w-quiet", inc, heartbeat_interval_s=INTERVAL)
        )
        for n in range(3):
            last = await publish(
                js, "heartbeat", "w-quiet", heartbeat_body("w-quiet", inc, completed_tasks=n)
            )
        beat = await eventually(lambda: folded(js, "w-quiet", last.seq))
        rec = await eventually(lambda: _expired_record(js, "w-quiet"), timeout=TIMEOUT + 3)
    expiry = await js.get_last_msg(EVENTS, "worker.expired.w-quiet")
    assert expiry.time is not None and expiry.data is not None
    silent_for = (expiry.time - stored_time(beat["last_heartbeat"])).total_seconds()
    assert TIMEOUT - 0.05 <= silent_for <= TIMEOUT + 1.0
    body = json.loads(expiry.data)
    assert body["v"] == 1 and body["worker_id"] == "w-quiet"
    assert body["timeout_s"] == TIMEOUT
    assert stored_time(body["last_heartbeat"]) == stored_time(beat["last_heartbeat"])
    assert rec["status"] == "offline" and rec["available"] is False
    assert rec["event_seq"] == expiry.seq


@bounded(20)
async def test_worker_with_clock_an_hour_behind_is_not_expired_while_it_beats(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, timeout_floor_s=FLOOR):
        body = register_body("w-late", inc, heartbeat_interval_s=INTERVAL,
                             sent_at=rfc3339(offset_s=-HOUR))  # fmt: skip
        await publish(js, "register", "w-late", body)
        async with Beater(js, {"w-late": inc}, INTERVAL, sent_offset_s=-HOUR) as beater:
            await beater.until(round(4 * TIMEOUT / INTERVAL))  # four timeouts of beating
            expired = await expired_events(js)
            rec = await record(js, "w-late")
    assert expired == 0
    assert rec is not None and rec["offline_reason"] is None and rec["status"] == "online"
    skew = abs((stored_time(rec["last_heartbeat"]) - datetime.now(UTC)).total_seconds())
    assert skew < 60  # the stored time, not the agent's clock


@bounded(20)
async def test_worker_with_clock_an_hour_ahead_still_expires_when_silent(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, timeout_floor_s=FLOOR):
        body = register_body("w-early", inc, heartbeat_interval_s=INTERVAL,
                             sent_at=rfc3339(offset_s=HOUR))  # fmt: skip
        await publish(js, "register", "w-early", body)
        await publish(
            js,
            "heartbeat",
            "w-early",
            heartbeat_body("w-early", inc, sent_at=rfc3339(offset_s=HOUR)),
        )
        rec = await eventually(lambda: _expired_record(js, "w-early"), timeout=TIMEOUT + 3)
    assert rec["status"] == "offline"


@bounded(20)
async def test_expiry_overtaken_by_a_heartbeat_is_ignored(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url) as registry:
        await publish(js, "register", "w-race", register_body("w-race", inc))
        first = await publish(js, "heartbeat", "w-race", heartbeat_body("w-race", inc))
        judged = (await eventually(lambda: folded(js, "w-race", first.seq)))["last_heartbeat"]
        # the heartbeat the sweeper had not seen when it judged
        later = await publish(js, "heartbeat", "w-race", heartbeat_body("w-race", inc, cpu=50.0))
        await eventually(lambda: folded(js, "w-race", later.seq))
        await publish(js, "expired", "w-race", expired_body("w-race", judged, 90.0))
        marker = await publish(js, "heartbeat", "w-race", heartbeat_body("w-race", inc, cpu=60.0))
        rec = await eventually(lambda: folded(js, "w-race", marker.seq))
        counters = registry.counters()
    assert rec["offline_reason"] is None and rec["status"] == "online"
    assert rec["version"] == 4  # register + three heartbeats; the stale expiry is not applied
    assert counters["events_ignored"] == 1


@bounded(20)
async def test_expiry_of_the_current_heartbeat_takes_worker_offline(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    # the registry's own sweeper would wait a minute: this expiry is published by hand
    async with running_registry(nats_server.url, timeout_floor_s=60.0, late_factor=0.0):
        body = register_body("w-gone", inc, heartbeat_interval_s=0.1)
        await publish(js, "register", "w-gone", body)
        beat = await publish(js, "heartbeat", "w-gone", heartbeat_body("w-gone", inc))
        judged = (await eventually(lambda: folded(js, "w-gone", beat.seq)))["last_heartbeat"]
        await asyncio.sleep(0.3)  # the silence the expiry claims (the fold checks stored times)
        ack = await publish(js, "expired", "w-gone", expired_body("w-gone", judged, 0.3))
        rec = await eventually(lambda: folded(js, "w-gone", ack.seq))
        avail = await eventually(lambda: _announced(js, "w-gone", ack.seq), timeout=2.0)
    assert rec["offline_reason"] == "expired" and rec["available"] is False
    assert avail["reason"] == "expired" and avail["available"] is False
    assert len(await bucket_records(js)) == 1


async def _announced(js: JetStreamContext, wid: str, seq: int) -> dict[str, Any] | None:
    avail = await last_availability(js, wid)
    return avail if avail["event_seq"] == seq else None
