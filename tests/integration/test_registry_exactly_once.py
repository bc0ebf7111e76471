"""Invariant 2: an event redelivered after a crash is not folded twice.

`registry up` runs as a child process and is killed with SIGKILL while a stream
of heartbeats is being folded; a second one takes over.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    CONSUMER,
    EVENTS,
    bounded,
    bucket_records,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
    registry_process,
)

WORKERS = 12
ROUNDS = 80


def _beat(round_: int, wid: str, inc: str) -> dict[str, Any]:
    return heartbeat_body(
        wid, inc, cpu=float(round_ % 100), memory=50.0, active_tasks=round_ % 2,
        completed_tasks=round_, failed_tasks=round_ // 10, avg_task_duration_seconds=round_ / 4,
    )  # fmt: skip


async def _heartbeats(
    js: JetStreamContext, workers: dict[str, str], sent: dict[str, list[tuple[int, dict[str, Any]]]]
) -> None:
    """ROUNDS rounds of heartbeats with increasing counters, paced like busy agents."""
    for r in range(1, ROUNDS + 1):
        for wid, inc in workers.items():
            body = _beat(r, wid, inc)
            ack = await publish(js, "heartbeat", wid, body)
            sent[wid].append((ack.seq, body["metrics"]))
        await asyncio.sleep(0.01)  # pacing: the kill must land while events still arrive


@pytest.mark.parametrize("lose_checkpoint", [False, True], ids=["kill9", "kill9_and_lost_consumer"])
@bounded(60)
async def test_kill9_mid_stream_folds_every_event_exactly_once(
    nats_server: NatsServer, nc: Client, tmp_path: Path, lose_checkpoint: bool
) -> None:
    """With a lost consumer too, the successor redelivers every event from seq 1."""
    js = nc.jetstream()
    args = ["--nats", nats_server.url, "--timeout-floor", "60"]
    workers = {f"w-{i:02d}": new_incarnation() for i in range(WORKERS)}
    sent: dict[str, list[tuple[int, dict[str, Any]]]] = {wid: [] for wid in workers}

    async with registry_process(args, tmp_path / "first.log") as first:
        assert await first.first_line() == nats_server.url  # provisioned and running
        for wid, inc in workers.items():
            ack = await publish(
                js, "register", wid, register_body(wid, inc, heartbeat_interval_s=30)
            )
            sent[wid].append((ack.seq, {}))
        beats = asyncio.create_task(_heartbeats(js, workers, sent))

        async def midway() -> bool:
            rec = await folded(js, "w-00", 1)
            return rec is not None and rec["metrics"]["completed_tasks"] >= ROUNDS // 4

        await eventually(midway, timeout=15.0)
        await first.kill9()
    assert not beats.done(), "the heartbeats must still be flowing when the registry dies"
    if lose_checkpoint:
        await js.delete_consumer(EVENTS, CONSUMER)

    async with registry_process(args, tmp_path / "second.log") as second:
        assert await second.first_line() == nats_server.url
        await asyncio.wait_for(beats, 30.0)

        async def all_folded() -> dict[str, dict[str, Any]] | None:
            records = await bucket_records(js)
            done = all(records.get(w, {}).get("event_seq") == sent[w][-1][0] for w in workers)
            return records if done else None

        records = await eventually(all_folded, timeout=15.0)

    for wid in workers:
        rec, (last_seq, last_metrics) = records[wid], sent[wid][-1]
        assert {k: rec["metrics"][k] for k in last_metrics} == last_metrics
        assert rec["version"] == len(sent[wid]) == 1 + ROUNDS  # register + every heartbeat, once
        assert rec["event_seq"] == last_seq
        assert rec["offline_reason"] is None
