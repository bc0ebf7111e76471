"""A recreated event stream is noticed: its sequence starts again at 1, so records
folded from the old one (event_seq far above it) would skip every new event as a
duplicate and freeze. The registry forgets what the new stream cannot explain,
loudly, and folds the new stream; workers register again when asked."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg

from registry import protocol
from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    heartbeat_body,
    new_incarnation,
    publish,
    record,
    register_body,
    running_registry,
)


@bounded(60)
async def test_a_recreated_event_stream_is_noticed_and_folded_from_the_start(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    incs = {wid: new_incarnation() for wid in ("w1", "w2")}
    async with running_registry(nats_server.url, caught_up=True) as registry:
        for wid, inc in incs.items():
            await publish(js, "register", wid, register_body(wid, inc))
        for _ in range(5):  # event_seq well above what a new stream will start with
            for wid, inc in incs.items():
                await publish(js, "heartbeat", wid, heartbeat_body(wid, inc))
        await eventually(
            lambda: registry.counters()["pending"] == 0 and len(registry.records()) == 2
        )
        assert registry.records()["w1"].event_seq > 3

        asked: list[Msg] = []
        control = await nc.subscribe(protocol.control_subject("w2"), cb=_into(asked))
        await js.delete_stream(protocol.EVENTS_STREAM)  # an operator's mistake, or a lost store
        await eventually(lambda: registry.counters()["streams_replaced"] == 1, timeout=20)
        assert dict(registry.records()) == {}  # nothing the new stream cannot explain

        # the new stream folds: w1 registers again and is live with the new sequence
        again = await publish(js, "register", "w1", register_body("w1", incs["w1"]))
        w1 = await eventually(lambda: record(js, "w1"), timeout=10)
        assert w1["event_seq"] == again.seq and w1["status"] == "online"
        beat = await publish(js, "heartbeat", "w1", heartbeat_body("w1", incs["w1"]))
        await eventually(lambda: registry.records()["w1"].last_heartbeat_seq == beat.seq)
        # w2 only beats: it is asked to register again (its record was forgotten)
        await publish(js, "heartbeat", "w2", heartbeat_body("w2", incs["w2"]))
        await eventually(lambda: any(json.loads(m.data)["action"] == "register" for m in asked))
        await control.unsubscribe()


def _into(box: list[Msg]) -> Callable[[Msg], Awaitable[None]]:
    async def take(msg: Msg) -> None:
        box.append(msg)

    return take
