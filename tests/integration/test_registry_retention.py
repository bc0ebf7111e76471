"""Offline records leave the bucket after the retention period; their history stays."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    folded,
    new_incarnation,
    publish,
    record,
    register_body,
    running_registry,
    unregister_body,
)


async def _gone(js: JetStreamContext, wid: str) -> bool:
    return await record(js, wid) is None


@bounded(30)
async def test_offline_record_is_purged_after_retention_and_can_register_again(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, retention_s=0.5, caught_up=True) as reg:
        await publish(js, "register", "w-old", register_body("w-old", inc))
        await publish(js, "register", "w-live", register_body("w-live", new_incarnation()))
        ack = await publish(js, "unregister", "w-old", unregister_body("w-old", inc))
        await eventually(lambda: folded(js, "w-old", ack.seq))
        await eventually(lambda: _gone(js, "w-old"), timeout=5)
        assert reg.counters()["offline_purged"] == 1
        assert await record(js, "w-live") is not None  # live records stay
        # a purged worker that comes back registers over the delete marker
        again = await publish(js, "register", "w-old", register_body("w-old", new_incarnation()))
        rec = await eventually(lambda: folded(js, "w-old", again.seq))
    assert rec["status"] == "online" and rec["offline_reason"] is None
    info = await js.stream_info("WORKER_EVENTS")
    assert info.state.messages == 4  # the history stays in the stream


@bounded(30)
async def test_records_inside_retention_stay(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, retention_s=3600, caught_up=True) as reg:
        await publish(js, "register", "w1", register_body("w1", inc))
        ack = await publish(js, "unregister", "w1", unregister_body("w1", inc))
        await eventually(lambda: folded(js, "w1", ack.seq))
        await reg.projector._idle()  # a purge pass
    rec = await record(js, "w1")
    assert rec is not None and rec["offline_reason"] == "unregistered"
