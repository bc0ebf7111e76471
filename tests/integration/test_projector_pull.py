"""The projector's continuous pull: a trickle of events is folded at once, whatever the batch size."""

from __future__ import annotations

import time

from nats.aio.client import Client

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
    running_registry,
)


@bounded(30)
async def test_each_event_of_a_trickle_is_folded_without_waiting_for_a_full_batch(
    nats_server: NatsServer, nc: Client
) -> None:
    # fetch(n) would hold each event until n arrived or its timeout (1 s) passed
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, batch_size=4096, caught_up=True):
        ack = await publish(js, "register", "w1", register_body("w1", inc))
        await eventually(lambda: folded(js, "w1", ack.seq))
        waits = []
        for n in range(5):
            t0 = time.monotonic()
            ack = await publish(js, "heartbeat", "w1", heartbeat_body("w1", inc, completed_tasks=n))
            await eventually(lambda: folded(js, "w1", ack.seq), interval=0.005)
            waits.append(time.monotonic() - t0)
    assert sorted(waits)[2] < 0.5, waits


@bounded(30)
async def test_projector_resumes_after_its_consumer_is_deleted(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        await js.delete_consumer("WORKER_EVENTS", "registry-projector")
        ack = await publish(js, "register", "w1", register_body("w1", inc))
        await eventually(lambda: folded(js, "w1", ack.seq), timeout=10)
        assert registry.counters()["resyncs"] >= 1
