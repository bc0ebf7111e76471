"""A plain NATS client's events are folded into bucket `workers`, and routers hear
about availability on worker.available.<id> only when something they decide on changes."""

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
    last_availability,
    new_incarnation,
    publish,
    register_body,
    running_registry,
    unregister_body,
)


async def _folded_within_a_second(nc: Client, wid: str, seq: int) -> dict[str, Any]:
    """The record once event `seq` is in it; fails if that takes more than a second."""
    return await eventually(lambda: folded(nc.jetstream(), wid, seq), timeout=1.0, interval=0.01)


async def _collect(nc: Client, wid: str) -> list[dict[str, Any]]:
    """Every announcement for `wid` from now on (core NATS subscription)."""
    got: list[dict[str, Any]] = []

    async def cb(msg: Msg) -> None:
        got.append(json.loads(msg.data))

    await nc.subscribe(f"worker.available.{wid}", cb=cb)
    await nc.flush()
    return got


@bounded(20)
async def test_register_is_folded_within_a_second(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url):
        inc = new_incarnation()
        ack = await publish(
            js, "register", "w-reg", register_body("w-reg", inc, max_concurrent_tasks=3)
        )
        rec = await _folded_within_a_second(nc, "w-reg", ack.seq)
    assert rec["status"] == "online"
    assert rec["available"] is True
    assert rec["incarnation"] == inc
    assert rec["offline_reason"] is None
    assert rec["registration"]["max_concurrent_tasks"] == 3
    assert rec["registration"]["hardware"]["gpu_models"] == ["NVIDIA L4"]
    assert rec["metrics"]["active_tasks"] == 0 and rec["metrics"]["cpu_usage_percent"] == 0.0
    assert rec["v"] == 1 and rec["event_seq"] == ack.seq


@bounded(20)
async def test_heartbeat_is_folded_within_a_second(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url):
        inc = new_incarnation()
        reg = await publish(js, "register", "w-hb", register_body("w-hb", inc))
        await eventually(lambda: folded(js, "w-hb", reg.seq))
        body = heartbeat_body(
            "w-hb", inc, status="busy", cpu=77.0, active_tasks=1, completed_tasks=9
        )
        ack = await publish(js, "heartbeat", "w-hb", body)
        rec = await _folded_within_a_second(nc, "w-hb", ack.seq)
    assert rec["status"] == "busy"
    assert rec["metrics"]["cpu_usage_percent"] == 77.0
    assert rec["metrics"]["completed_tasks"] == 9
    assert rec["available"] is False


@bounded(20)
async def test_unregister_is_folded_within_a_second(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url):
        inc = new_incarnation()
        reg = await publish(js, "register", "w-unreg", register_body("w-unreg", inc))
        await eventually(lambda: folded(js, "w-unreg", reg.seq))
        ack = await publish(js, "unregister", "w-unreg", unregister_body("w-unreg", inc))
        rec = await _folded_within_a_second(nc, "w-unreg", ack.seq)
    assert rec["status"] == "offline"
    assert rec["available"] is False
    assert rec["offline_reason"] == "unregistered"


@bounded(20)
async def test_registration_is_announced_as_available(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url):
        inc = new_incarnation()
        body = register_body("w-ann", inc, capability="hybrid", max_concurrent_tasks=4,
                             supported_content_types=["audio", "text"])  # fmt: skip
        ack = await publish(js, "register", "w-ann", body)
        avail = await eventually(lambda: last_availability(js, "w-ann"), timeout=2.0)
    assert avail == {
        "v": 1, "worker_id": "w-ann", "available": True, "status": "online",
        "capability": "hybrid", "supported_content_types": ["audio", "text"],
        "active_tasks": 0, "max_concurrent_tasks": 4, "reason": "ok",
        "changed_at": avail["changed_at"], "event_seq": ack.seq,
    }  # fmt: skip


@bounded(20)
async def test_metrics_only_heartbeat_is_not_announced(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    heard = await _collect(nc, "w-quiet")
    async with running_registry(nats_server.url):
        inc = new_incarnation()
        await publish(js, "register", "w-quiet", register_body("w-quiet", inc))
        await eventually(lambda: len(heard) == 1, timeout=2.0)
        for cpu in (35.0, 60.0, 91.5):  # each folded in a batch of its own
            body = heartbeat_body("w-quiet", inc, cpu=cpu, memory=cpu / 2, completed_tasks=3)
            ack = await publish(js, "heartbeat", "w-quiet", body)
            await eventually(lambda seq=ack.seq: folded(js, "w-quiet", seq))
        # A change routers care about, published last: once it is heard, every
        # earlier heartbeat has been folded (one ordered consumer, one connection).
        marker = await publish(js, "heartbeat", "w-quiet", heartbeat_body("w-quiet", inc,
                                                                          status="maintenance"))  # fmt: skip
        await eventually(lambda: heard and heard[-1]["event_seq"] == marker.seq, timeout=2.0)
    assert [(a["status"], a["reason"]) for a in heard] == [
        ("online", "ok"), ("maintenance", "maintenance"),
    ]  # fmt: skip


@bounded(20)
async def test_reaching_max_active_tasks_announces_full(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    heard = await _collect(nc, "w-full")
    async with running_registry(nats_server.url):
        inc = new_incarnation()
        await publish(
            js, "register", "w-full", register_body("w-full", inc, max_concurrent_tasks=2)
        )
        await publish(js, "heartbeat", "w-full", heartbeat_body("w-full", inc, active_tasks=1))
        full = await publish(
            js, "heartbeat", "w-full", heartbeat_body("w-full", inc, active_tasks=2)
        )
        await eventually(lambda: heard and heard[-1]["event_seq"] == full.seq, timeout=2.0)
        stored = await last_availability(js, "w-full")
    assert heard[-1]["available"] is False
    assert heard[-1]["reason"] == "full"
    assert heard[-1]["active_tasks"] == heard[-1]["max_concurrent_tasks"] == 2
    assert stored == heard[-1]


@bounded(20)
async def test_availability_stream_keeps_last_per_worker(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url):
        a, b = new_incarnation(), new_incarnation()
        await publish(js, "register", "w-a", register_body("w-a", a))
        await publish(js, "register", "w-b", register_body("w-b", b))
        last_a = await publish(js, "heartbeat", "w-a", heartbeat_body("w-a", a, status="error"))
        last_b = await publish(js, "unregister", "w-b", unregister_body("w-b", b))
        await eventually(lambda: folded(js, "w-a", last_a.seq))
        await eventually(lambda: folded(js, "w-b", last_b.seq))

        async def settled() -> bool:
            info = await js.stream_info("WORKER_AVAILABILITY")
            return info.state.messages == 2 and (
                (await last_availability(js, "w-a"))["event_seq"] == last_a.seq
                and (await last_availability(js, "w-b"))["event_seq"] == last_b.seq
            )

        await eventually(settled, timeout=2.0)
    assert (await last_availability(js, "w-a"))["reason"] == "error"
    assert (await last_availability(js, "w-b"))["reason"] == "unregistered"
