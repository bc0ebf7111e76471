"""Invariant 5: an event for an unknown worker is never silently dropped; a zombie
incarnation cannot touch the record of the process that replaced it."""

from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    record,
    register_body,
    running_registry,
    unregister_body,
)


async def _controls(nc: Client, wid: str) -> list[dict[str, Any]]:
    """Every control message for `wid` from now on (core NATS, no stream)."""
    got: list[dict[str, Any]] = []

    async def cb(msg: Msg) -> None:
        got.append(json.loads(msg.data))

    await nc.subscribe(f"worker.control.{wid}", cb=cb)
    await nc.flush()
    return got


def _is_register_request(body: dict[str, Any]) -> bool:
    return (
        body["v"] == 1 and body["action"] == "register"
        and isinstance(body["reason"], str) and bool(body["reason"])
    )  # fmt: skip


@bounded(20)
async def test_heartbeat_of_never_registered_worker_is_told_to_register(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    controls = await _controls(nc, "w-stranger")
    async with running_registry(nats_server.url) as registry:
        await publish(
            js, "heartbeat", "w-stranger", heartbeat_body("w-stranger", new_incarnation())
        )
        await eventually(lambda: controls, timeout=3.0)
        counters = registry.counters()
    assert [_is_register_request(c) for c in controls] == [True]
    assert await record(js, "w-stranger") is None
    assert counters["events_unregistered"] == 1


@bounded(20)
async def test_heartbeat_after_unregister_is_told_to_register(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    controls = await _controls(nc, "w-left")
    async with running_registry(nats_server.url):
        await publish(js, "register", "w-left", register_body("w-left", inc))
        left = await publish(js, "unregister", "w-left", unregister_body("w-left", inc))
        await eventually(lambda: folded(js, "w-left", left.seq))
        await publish(js, "heartbeat", "w-left", heartbeat_body("w-left", inc))
        await eventually(lambda: controls, timeout=3.0)
    assert _is_register_request(controls[0])
    rec = await record(js, "w-left")
    assert rec is not None and rec["offline_reason"] == "unregistered"
    assert rec["event_seq"] == left.seq


@bounded(20)
async def test_registering_again_after_control_brings_worker_online(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    controls = await _controls(nc, "w-late")
    async with running_registry(nats_server.url):
        await publish(js, "heartbeat", "w-late", heartbeat_body("w-late", inc))
        await eventually(lambda: controls, timeout=3.0)
        # what the agent does on {action: register}: register with its current incarnation
        ack = await publish(js, "register", "w-late", register_body("w-late", inc))
        rec = await eventually(lambda: folded(js, "w-late", ack.seq))
    assert rec["status"] == "online" and rec["available"] is True
    assert rec["incarnation"] == inc


@bounded(20)
async def test_expired_worker_is_revived_by_its_own_heartbeat(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, timeout_floor_s=0.1):
        await publish(
            js, "register", "w-part", register_body("w-part", inc, heartbeat_interval_s=0.1)
        )

        async def expired() -> bool:
            rec = await record(js, "w-part")
            return rec is not None and rec["offline_reason"] == "expired"

        await eventually(expired, timeout=5.0)
        # the partition heals: the same process beats again
        ack = await publish(js, "heartbeat", "w-part", heartbeat_body("w-part", inc, cpu=33.0))
        rec = await eventually(lambda: folded(js, "w-part", ack.seq))
    assert rec["status"] == "online"
    assert rec["offline_reason"] is None
    assert rec["available"] is True
    assert rec["incarnation"] == inc
    assert rec["metrics"]["cpu_usage_percent"] == 33.0


@bounded(20)
async def test_zombie_heartbeat_cannot_touch_the_restarted_worker(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    old, new = new_incarnation(), new_incarnation()
    async with running_registry(nats_server.url):
        await publish(js, "register", "w-z", register_body("w-z", old))
        await publish(js, "register", "w-z", register_body("w-z", new))
        await publish(js, "heartbeat", "w-z", heartbeat_body("w-z", old, status="error", cpu=99.0,
                                                             active_tasks=2))  # fmt: skip
        marker = await publish(js, "heartbeat", "w-z", heartbeat_body("w-z", new, cpu=7.0))
        rec = await eventually(lambda: folded(js, "w-z", marker.seq))
    assert rec["incarnation"] == new
    assert rec["status"] == "online" and rec["available"] is True
    assert rec["metrics"]["cpu_usage_percent"] == 7.0
    assert rec["version"] == 3  # two registrations and the live heartbeat; the zombie's not


@bounded(20)
async def test_zombie_unregister_cannot_take_the_restarted_worker_offline(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    old, new = new_incarnation(), new_incarnation()
    async with running_registry(nats_server.url):
        await publish(js, "register", "w-z", register_body("w-z", old))
        await publish(js, "register", "w-z", register_body("w-z", new))
        await publish(js, "unregister", "w-z", unregister_body("w-z", old))
        marker = await publish(js, "heartbeat", "w-z", heartbeat_body("w-z", new))
        rec = await eventually(lambda: folded(js, "w-z", marker.seq))
    assert rec["incarnation"] == new
    assert rec["offline_reason"] is None and rec["status"] == "online"
    assert rec["version"] == 3
