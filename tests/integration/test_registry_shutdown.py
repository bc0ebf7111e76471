"""A cancelled registry stops, even when the cancel lands in the middle of a fold
(on Python 3.11 `asyncio.wait_for`, used throughout nats-py, can swallow a cancel
that races a reply; the registry's loops must not carry on regardless)."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

from registry.server import app
from registry.server.embedded import NatsServer
from registry.server.settings import RegistrySettings
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
)

ROUNDS = 40


@bounded(60)
async def test_serve_stops_when_cancelled_right_after_a_fold(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    settings = RegistrySettings(nats_url=nats_server.url, timeout_floor_s=0.3)
    for n in range(ROUNDS):
        task = asyncio.create_task(app.serve(settings))
        wid, inc = f"w-{n}", new_incarnation()
        await eventually(lambda: publish(js, "register", wid, register_body(wid, inc)))  # noqa: B023
        ack = await publish(js, "heartbeat", wid, heartbeat_body(wid, inc))
        await eventually(lambda: folded(js, wid, ack.seq), interval=0.001)  # noqa: B023
        task.cancel()  # as close to the fold as the test can see it
        done, _ = await asyncio.wait({task}, timeout=5.0)
        assert done, f"serve() still running 5 s after cancel (round {n})"
        assert task.cancelled()
