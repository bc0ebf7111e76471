"""Invariant 3: no false expiry after registry downtime, and a restarted registry
resumes folding within seconds (no event waits for the 30 s redelivery timeout)."""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client
from nats.js import JetStreamContext

from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    CONSUMER,
    EVENTS,
    Beater,
    bounded,
    bucket_records,
    expired_events,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
    running_registry,
)

INTERVAL = 0.2
FLOOR = 0.3
TIMEOUT = max(FLOOR, 3 * INTERVAL)  # what the registry computes: 0.6 s
ROUNDS_PER_TIMEOUT = round(TIMEOUT / INTERVAL)
WORKERS = 4


async def _beats_folded(js: JetStreamContext, beater: Beater) -> bool:
    return all([await folded(js, wid, ack.seq) for wid, ack in beater.last.items()])


@bounded(40)
async def test_no_false_expiry_after_downtime_longer_than_timeout(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    workers = {f"w-{i:02d}": new_incarnation() for i in range(WORKERS)}
    await provision(nc)
    for wid, inc in workers.items():
        await publish(js, "register", wid, register_body(wid, inc, heartbeat_interval_s=INTERVAL))
    async with Beater(js, workers, INTERVAL) as beater:
        async with running_registry(nats_server.url, timeout_floor_s=FLOOR):
            await beater.until(1)
            await eventually(lambda: _beats_folded(js, beater))
        await beater.until(3 * ROUNDS_PER_TIMEOUT)  # down for three timeouts; workers beat on
        async with running_registry(nats_server.url, timeout_floor_s=FLOOR) as registry:
            await beater.until(3 * ROUNDS_PER_TIMEOUT)  # judged for three timeouts
            assert registry.sweeper.started
            expired = await expired_events(js)
            records = await bucket_records(js)
    assert expired == 0
    assert {wid: (r["status"], r["offline_reason"]) for wid, r in records.items()} == {
        wid: ("online", None) for wid in workers
    }


@bounded(30)
async def test_restart_folds_backlog_without_waiting_for_redelivery(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url):
        reg = await publish(js, "register", "w-1", register_body("w-1", inc))
        await eventually(lambda: folded(js, "w-1", reg.seq))
    for n in range(1, 6):  # published while the registry is down
        last = await publish(js, "heartbeat", "w-1", heartbeat_body("w-1", inc, completed_tasks=n))
    # a projector that died mid-batch: events delivered, never acknowledged (ack_wait 30 s)
    crashed = await js.pull_subscribe_bind(durable=CONSUMER, stream=EVENTS)
    assert len(await crashed.fetch(5, timeout=2.0)) == 5
    await crashed.unsubscribe()

    started = time.monotonic()
    async with running_registry(nats_server.url):
        rec = await eventually(lambda: folded(js, "w-1", last.seq), timeout=5.0, interval=0.01)
        took = time.monotonic() - started
    assert took < 2.0, f"backlog folded only after {took:.1f} s"
    assert rec["metrics"]["completed_tasks"] == 5
    assert rec["version"] == 6


@bounded(40)
async def test_registry_resumes_folding_after_nats_server_restart(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url):
        reg = await publish(js, "register", "w-1", register_body("w-1", inc))
        await eventually(lambda: folded(js, "w-1", reg.seq))
        await asyncio.to_thread(nats_server.restart)
        body = heartbeat_body("w-1", inc, completed_tasks=7)
        ack = await eventually(lambda: publish(js, "heartbeat", "w-1", body), timeout=15.0)
        rec = await eventually(lambda: folded(js, "w-1", ack.seq), timeout=15.0)
    assert rec["metrics"]["completed_tasks"] == 7
    assert rec["offline_reason"] is None
