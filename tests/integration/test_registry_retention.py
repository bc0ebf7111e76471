"""Offline records leave the bucket after the retention period; their history stays."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    AVAILABILITY,
    BUCKET,
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


async def _messages(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


@bounded(30)
async def test_a_worker_back_after_its_marker_expired_registers_again(
    nats_server: NatsServer, nc: Client
) -> None:
    """The marker's TTL ran out on the server before the registry forgot its revision:
    the write that expected the marker is refused, and repaired."""
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, retention_s=0.5, purge_marker_ttl_s=1,
                                caught_up=True) as reg:  # fmt: skip
        await publish(js, "register", "w1", register_body("w1", inc))
        await publish(js, "unregister", "w1", unregister_body("w1", inc))
        await eventually(lambda: reg.counters()["offline_purged"] == 1, timeout=10)
        assert "w1" in reg.projector.markers.revisions

        async def bucket_empty() -> bool:
            return await _messages(js, f"KV_{BUCKET}") == 0

        await eventually(bucket_empty, timeout=10)
        remembered = "w1" in reg.projector.markers.revisions  # forgotten 2 s after the TTL
        with capture_logs() as logs:
            again = await publish(js, "register", "w1", register_body("w1", new_incarnation()))
            rec = await eventually(lambda: folded(js, "w1", again.seq))
    assert rec["status"] == "online"
    assert reg.counters()["resyncs"] == 0 and reg.counters()["foreign_writes_repaired"] == 0
    assert not remembered or any(e["event"] == "write_over_marker_repaired" for e in logs)


@bounded(30)
async def test_an_older_versions_markers_are_purged_again_with_a_ttl(
    nats_server: NatsServer, nc: Client
) -> None:
    """A delete marker without a TTL (an older registry's purge) and the worker's last
    availability are replaced by TTL'd ones, which the server then removes."""
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, caught_up=True) as reg:
        await publish(js, "register", "w-live", register_body("w-live", new_incarnation()))
        await publish(js, "register", "w-old", register_body("w-old", inc))
        ack = await publish(js, "unregister", "w-old", unregister_body("w-old", inc))
        await eventually(lambda: folded(js, "w-old", ack.seq))
    kv = await js.key_value(BUCKET)
    await kv.delete("w-old")  # as an older version purged: a marker that stays forever
    assert await _messages(js, AVAILABILITY) == 2
    async with running_registry(nats_server.url, purge_marker_ttl_s=1, caught_up=True) as reg:

        async def only_the_live_one() -> bool:
            return (await _messages(js, f"KV_{BUCKET}"), await _messages(js, AVAILABILITY)) == (1, 1)

        await eventually(only_the_live_one, timeout=15)
        assert set(reg.records()) == {"w-live"}
