"""What is NOT promised: the registry has no authentication or authorization.

These tests pin today's limits so that docs/guarantees.md can name them; they
pass because the limits are real. Whoever can publish to worker.> (or call the
JetStream API) on the server is trusted: the incarnation that fences zombies is
not a secret (every event carries it, and anyone who can read the stream reads
it). One limit is gone and is pinned here as such: a verdict (expired, late) is
an event like any other, but the fold applies it only after the silence it
claims, so a forged one no longer takes a beating worker offline.
"""

from __future__ import annotations

from nats.aio.client import Client

from registry.server.embedded import NatsServer
from registry.server.provision import api
from tests.conftest import eventually
from tests.faults.helpers import stream_messages
from tests.integration.registry_helpers import (
    EVENTS,
    bounded,
    expired_body,
    folded,
    new_incarnation,
    projected,
    publish,
    register_body,
    running_registry,
    unregister_body,
)


@bounded(20)
async def test_anyone_who_reads_the_stream_can_unregister_a_worker(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True):
        await publish(js, "register", "victim", register_body("victim", new_incarnation()))
        (stored,) = await stream_messages(js, "worker.register.victim")
        incarnation = stored.json()["incarnation"]  # nothing secret about it
        ack = await publish(js, "unregister", "victim", unregister_body("victim", incarnation))
        rec = await eventually(lambda: folded(js, "victim", ack.seq))
    assert rec["offline_reason"] == "unregistered"


@bounded(20)
async def test_an_expiry_forged_right_after_a_beat_changes_nothing(
    nats_server: NatsServer, nc: Client
) -> None:
    """Was a limit (anyone could take a live worker offline until its next beat): the
    fold now applies a verdict only once the stored times show the silence it claims,
    and only if it claims what the registry would (tests/integration/test_forged_input.py)."""
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        reg = await publish(js, "register", "victim", register_body("victim", new_incarnation(),
                                                                    heartbeat_interval_s=3600))  # fmt: skip
        rec = await eventually(lambda: folded(js, "victim", reg.seq))
        forged = expired_body("victim", rec["last_heartbeat"], 1.0)  # read from the bucket
        ack = await publish(js, "expired", "victim", forged)
        rec = await projected(js, registry, "victim", ack.seq)
    assert rec["offline_reason"] is None and rec["available"] is True


@bounded(20)
async def test_anyone_with_jetstream_api_access_can_delete_the_event_stream(
    nats_server: NatsServer, nc: Client
) -> None:
    """deny_delete and deny_purge stop message deletes and purges (see
    tests/integration/test_fuzz_events.py), not the deletion of the whole stream."""
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True):
        await publish(js, "register", "w1", register_body("w1", new_incarnation()))
        deleted = await api(nc, f"STREAM.DELETE.{EVENTS}")
    assert deleted.get("success") is True
    assert "error" in await api(nc, f"STREAM.INFO.{EVENTS}")
