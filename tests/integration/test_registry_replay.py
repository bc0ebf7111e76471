"""Invariant 1: deleting the bucket and the projector's consumer and restarting
rebuilds exactly the same state from the stream."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    BUCKET,
    CONSUMER,
    EVENTS,
    bounded,
    bucket_records,
    expired_body,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    record,
    register_body,
    running_registry,
    unregister_body,
)

SLOW = 60.0  # heartbeat interval of the workers that stay live: nobody is swept meanwhile


async def _mixed_history(js: JetStreamContext) -> dict[str, int]:
    """Several workers' lives; returns the stream seq each record must end at."""
    last: dict[str, int] = {}

    async def send(kind: str, wid: str, body: dict[str, Any], counts: bool = True) -> None:
        ack = await publish(js, kind, wid, body)
        if counts:
            last[wid] = ack.seq

    gpu, cpu, gone, silent = (new_incarnation() for _ in range(4))
    old, new, back = new_incarnation(), new_incarnation(), new_incarnation()
    await send("register", "w-gpu", register_body("w-gpu", gpu, heartbeat_interval_s=SLOW))
    await send(
        "register",
        "w-cpu",
        register_body(
            "w-cpu", cpu, heartbeat_interval_s=SLOW, capability="cpu", supported_content_types=[]
        ),
    )
    await send("register", "w-gone", register_body("w-gone", gone, heartbeat_interval_s=SLOW))
    await send(
        "heartbeat",
        "w-gpu",
        heartbeat_body(
            "w-gpu", gpu, status="busy", active_tasks=2, cpu=88.0, gpu=97.5, completed_tasks=10
        ),
    )
    await send("heartbeat", "w-cpu", heartbeat_body("w-cpu", cpu, status="maintenance"))
    await send("heartbeat", "w-gone", heartbeat_body("w-gone", gone, completed_tasks=4))
    await send("unregister", "w-gone", unregister_body("w-gone", gone, reason="scale-in"))
    await send(
        "heartbeat",
        "w-gpu",
        heartbeat_body("w-gpu", gpu, active_tasks=1, cpu=41.0, completed_tasks=12, failed_tasks=1),
    )
    await send("heartbeat", "w-cpu", heartbeat_body("w-cpu", cpu, status="error", cpu=3.0))
    # a zombie: the worker restarted with a new incarnation; the old one keeps talking
    await send("register", "w-zombie", register_body("w-zombie", old, heartbeat_interval_s=SLOW))
    await send("heartbeat", "w-zombie", heartbeat_body("w-zombie", old, completed_tasks=1))
    await send(
        "register",
        "w-zombie",
        register_body("w-zombie", new, heartbeat_interval_s=SLOW, max_concurrent_tasks=8),
    )
    await send("heartbeat", "w-zombie", heartbeat_body("w-zombie", old, completed_tasks=99), False)
    await send("unregister", "w-zombie", unregister_body("w-zombie", old), False)
    await send("heartbeat", "w-zombie", heartbeat_body("w-zombie", new, active_tasks=3))
    # expired by a published expiry, then revived by its own incarnation
    # (at a short interval: the fold applies an expiry only after the silence it claims,
    # at least two intervals; the sweeper would judge after three)
    await send("register", "w-back", register_body("w-back", back, heartbeat_interval_s=0.2))
    await eventually(lambda: folded(js, "w-back", last["w-back"]))
    judged = (await record(js, "w-back"))["last_heartbeat"]  # type: ignore[index]
    await asyncio.sleep(0.4)
    await send("expired", "w-back", expired_body("w-back", judged, 0.4))
    await send("heartbeat", "w-back", heartbeat_body("w-back", back, completed_tasks=7))
    # the same process registers again at a slow interval: nobody sweeps it meanwhile
    await send("register", "w-back", register_body("w-back", back, heartbeat_interval_s=SLOW))
    # operator actions: cordoned (and still so after a restart), drained, uncordoned
    op = {"v": 1, "by": "alice", "reason": "disk", "sent_at": "2026-12-07T12:00:00Z"}
    await send("cordon", "w-cpu", op | {"worker_id": "w-cpu"})
    await send("drain", "w-zombie", op | {"worker_id": "w-zombie", "by": "bob"})
    await send("cordon", "w-gone", op | {"worker_id": "w-gone"})
    await send("uncordon", "w-gone", op | {"worker_id": "w-gone", "reason": "fixed"})
    await send("cordon", "w-nobody", op | {"worker_id": "w-nobody"}, False)  # ignored
    # a heartbeat nobody registered: no record, only a control message
    await send("heartbeat", "w-stranger", heartbeat_body("w-stranger", new_incarnation()), False)
    # expired by the sweeper: beats once at a short interval, then goes silent
    await send("register", "w-silent", register_body("w-silent", silent, heartbeat_interval_s=0.1))
    await send("heartbeat", "w-silent", heartbeat_body("w-silent", silent, cpu=5.0))
    return last


async def _all_folded(js: JetStreamContext, last: dict[str, int]) -> bool:
    for wid, seq in last.items():
        if await folded(js, wid, seq) is None:
            return False
    silent = await record(js, "w-silent")
    return silent is not None and silent["offline_reason"] == "expired"


@bounded(40)
async def test_replay_rebuilds_identical_bucket(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, timeout_floor_s=0.1):
        last = await _mixed_history(js)
        await eventually(lambda: _all_folded(js, last), timeout=10.0)
    snapshot = await bucket_records(js)
    assert {wid: (r["status"], r["offline_reason"]) for wid, r in snapshot.items()} == {
        "w-gpu": ("online", None), "w-cpu": ("error", None), "w-gone": ("offline", "unregistered"),
        "w-zombie": ("online", None), "w-back": ("online", None),
        "w-silent": ("offline", "expired"),
    }  # fmt: skip
    assert {wid: (r["cordon"] or {}).get("by") for wid, r in snapshot.items() if r["cordon"]} == {
        "w-cpu": "alice", "w-zombie": "bob"}  # fmt: skip
    assert snapshot["w-zombie"]["cordon"]["drain"] and not snapshot["w-zombie"]["available"]

    await js.delete_consumer(EVENTS, CONSUMER)
    await js.delete_stream(f"KV_{BUCKET}")
    async with running_registry(nats_server.url, timeout_floor_s=0.1):

        async def rebuilt() -> dict[str, Any] | None:
            records = await bucket_records(js)
            seqs = {wid: r["event_seq"] for wid, r in records.items()}
            return records if seqs == {w: r["event_seq"] for w, r in snapshot.items()} else None

        records = await eventually(rebuilt, timeout=10.0)
    assert records == snapshot
