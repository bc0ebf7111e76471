"""The simulator's publisher through a gap in which no stream answers (a stream
leader being elected looks the same: 503, nothing stored): every event is sent
again under its own Nats-Msg-Id until the stream takes it, and is stored once."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

from agent.simulate import AckedPublisher
from registry import protocol
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.integration.registry_helpers import bounded

EVENTS = 300


@bounded(60)
async def test_events_refused_while_no_stream_answers_are_stored_once_when_it_does(
    nats_server: NatsServer, nc: Client
) -> None:
    publisher = AckedPublisher(nc, window=EVENTS, retry_s=15.0)
    await publisher.start()
    for i in range(EVENTS):  # no stream yet: each answered 503, and kept
        await publisher.publish(f"worker.heartbeat.sim-{i % 30}", b'{"n": %d}' % i)
    await asyncio.sleep(1.0)
    assert publisher.retried > 0 and publisher.acked == 0 and publisher.errors == 0
    await provision(nc)  # the stream is back (an election is over)
    await publisher.settle(20.0)
    assert (publisher.acked, publisher.errors, publisher.timeouts) == (EVENTS, 0, 0)
    state = (await nc.jetstream().stream_info(protocol.EVENTS_STREAM)).state
    assert state.messages == EVENTS  # each once, however often it was sent


@bounded(60)
async def test_a_publish_that_keeps_failing_gives_up_after_its_retry_time(
    nats_server: NatsServer, nc: Client
) -> None:
    publisher = AckedPublisher(nc, window=10, retry_s=1.0)
    await publisher.start()
    await publisher.publish("worker.heartbeat.sim-1", b"{}")
    await publisher.settle(10.0)
    assert (publisher.acked, publisher.errors) == (0, 1) and publisher.retried >= 2
