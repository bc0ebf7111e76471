"""registry.server.link: the connection epoch and the caught-up state have one owner.

A nats-server restart starts a new epoch: caught-up state of the old one is void
at once, without anyone clearing a flag, and a projector batch read in the old
epoch cannot make the sweeper judge in the new one.
"""

from __future__ import annotations

import asyncio
import time

import nats
from nats.aio.client import Client

from registry.server.embedded import NatsServer
from registry.server.link import Link
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    new_incarnation,
    projected,
    publish,
    register_body,
    running_registry,
)


async def _restart(server: NatsServer, nc: Client, epoch: int) -> None:
    await asyncio.to_thread(server.restart)
    await eventually(lambda: nc.is_connected and nc.stats["reconnects"] > epoch, timeout=15.0)


@bounded(30)
async def test_a_reconnect_voids_caught_up_and_an_old_epoch_cannot_restore_it(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        link = Link(nc)
        old = link.epoch
        link.caught_up(old)
        assert link.is_caught_up and not link.lost_since(old)
        await _restart(nats_server, nc, old)
        assert link.epoch == old + 1 and link.reconnected_since(old) and link.lost_since(old)
        assert not link.is_caught_up  # nobody cleared anything
        link.caught_up(old)  # a batch read before the reconnect
        assert not link.is_caught_up
        waiter = asyncio.create_task(link.wait_caught_up())
        await asyncio.sleep(0.3)
        assert not waiter.done()
        link.caught_up(link.epoch)
        assert await asyncio.wait_for(waiter, 2.0) == old + 1
        link.fell_behind()
        assert not link.is_caught_up
    finally:
        await nc.close()


@bounded(40)
async def test_the_registry_judges_again_only_in_the_new_epoch(nats_server: NatsServer) -> None:
    async with running_registry(nats_server.url, caught_up=True) as registry:
        first = registry.link.epoch
        assert registry.sweeper.judging_in == first
        await _restart(nats_server, registry.link.nc, first)
        await eventually(lambda: registry.link.is_caught_up, timeout=15.0)
        await eventually(lambda: registry.sweeper.judging_in == registry.link.epoch, timeout=5.0)
        assert registry.link.epoch > first
        assert registry.projector.counters.resyncs >= 1  # it reloaded in the new epoch


@bounded(60)
async def test_after_an_outage_nobody_is_judged_before_the_outage_grace(
    nats_server: NatsServer, nc: Client
) -> None:
    """A restart of the registry grants one timeout; an outage grants `outage_grace_s`:
    every worker has to reconnect and retry its heartbeat, not just send the next one."""
    js = nc.jetstream()
    async with running_registry(
        nats_server.url, caught_up=True, timeout_floor_s=1.0, outage_grace_s=30.0
    ) as registry:
        ack = await publish(js, "register", "w-1",
                            register_body("w-1", new_incarnation(), heartbeat_interval_s=1.0))  # fmt: skip
        await projected(js, registry, "w-1", ack.seq)
        sweeper = registry.sweeper
        at = sweeper.heap.at("w-1")
        assert at is not None and at - registry.clock.now(time.monotonic()) < 3.5  # one timeout

        first = registry.link.epoch
        await _restart(nats_server, registry.link.nc, first)
        await eventually(lambda: sweeper.judging_in == registry.link.epoch, timeout=15.0)
        at = sweeper.heap.at("w-1")
        assert at is not None and at - registry.clock.now(time.monotonic()) > 20.0
        assert not registry.link.take_trouble()  # the grace took it


@bounded(20)
async def test_trouble_is_taken_once_and_a_reconnect_is_trouble(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        link = Link(nc)
        assert not link.take_trouble()
        link.trouble()
        assert link.take_trouble() and not link.take_trouble()
        await _restart(nats_server, nc, link.epoch)
        assert link.take_trouble() and not link.take_trouble()
    finally:
        await nc.close()
