"""The query service on a live registry: its catalog follows the projector, and a
client listing the fleet as fast as it can does not slow folding or sweeping."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from bench.common import percentiles
from registry import query
from registry.protocol import WorkerCapability
from registry.server import app
from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    Beater,
    bounded,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    record,
    register_body,
    registry_process,
    running_registry,
    unregister_body,
)

# ---------------------------------------------------------------- the catalog follows the fold


def assert_catalog_is_the_scan(reg: app.Registry) -> None:
    records, catalog = reg.records(), reg.catalog()
    assert catalog.stats() == query.stats(records.values())
    for capability in (None, *WorkerCapability):
        for content_type in (None, "video", "text"):
            assert catalog.pick(capability, content_type) == query.pick(
                records.values(), capability, content_type
            )
    assert list(catalog.after(None)) == query.select(
        records.values(), query.Filter(include_offline=True)
    )


@bounded(30)
async def test_stats_and_pick_follow_registers_beats_leaves_and_purges(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    incs = {f"w{i}": new_incarnation() for i in range(6)}
    async with running_registry(nats_server.url, retention_s=1.0, caught_up=True) as reg:
        for i, (wid, inc) in enumerate(incs.items()):
            cap = ("gpu", "cpu", "hybrid")[i % 3]
            types = [["video"], ["text"], []][i % 3]
            await publish(js, "register", wid, register_body(
                wid, inc, capability=cap, supported_content_types=types))  # fmt: skip
        await publish(js, "heartbeat", "w0", heartbeat_body("w0", incs["w0"], active_tasks=1))
        await publish(js, "heartbeat", "w1", heartbeat_body("w1", incs["w1"], status="busy"))
        ack = await publish(js, "unregister", "w2", unregister_body("w2", incs["w2"]))
        await eventually(lambda: folded(js, "w2", ack.seq))
        assert_catalog_is_the_scan(reg)
        assert reg.catalog().stats().offline == 1
        await eventually(lambda: reg.counters()["offline_purged"] == 1, timeout=10)
        assert await record(js, "w2") is None
        assert_catalog_is_the_scan(reg)
        assert "w2" not in reg.catalog().records
        msg = await nc.request("registry.stats", b"{}", timeout=5.0)
        answer = json.loads(msg.data)
    assert {k: answer[k] for k in query.Stats.__struct_fields__} == msgspec.structs.asdict(
        query.stats(reg.records().values())
    )


# ---------------------------------------------------------------- listing under load

FLEET = 10_000
BEATING = 100  # the last ones beat every BEAT_S; the others registered with a 30 s interval
BEAT_S = 0.5
LISTING_S = 8.0
P99_MS = 50.0


class _Page(msgspec.Struct):
    workers: list[msgspec.Raw]
    next: str | None


class _Record(msgspec.Struct):
    event_seq: int = 0
    last_heartbeat_seq: int = 0
    last_heartbeat: datetime | None = None


_PAGE = msgspec.json.Decoder(_Page)
_RECORD = msgspec.json.Decoder(_Record)


async def register_fleet(nc: Client, count: int) -> dict[str, str]:
    js = nc.jetstream()
    incs = {f"w{i:05d}": new_incarnation() for i in range(count)}
    items = list(incs.items())
    for start in range(0, count, 500):
        await asyncio.gather(*(
            publish(js, "register", wid, register_body(
                wid, inc, heartbeat_interval_s=BEAT_S if i >= count - BEATING else 30.0))
            for i, (wid, inc) in enumerate(items[start:start + 500], start)
        ))  # fmt: skip
    return incs


async def stats(nc: Client) -> dict[str, Any]:
    msg = await nc.request("registry.stats", b"{}", timeout=5.0)
    answer: dict[str, Any] = json.loads(msg.data)
    return answer


async def list_for(nc: Client, seconds: float) -> tuple[int, list[int]]:
    """Page through the fleet again and again for `seconds`: pages asked, workers per pass."""
    pages, passes, seen, after = 0, [], 0, None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = json.dumps({"limit": 500, "after": after}).encode()
        msg = await nc.request("registry.list", body, timeout=5.0)
        assert not (msg.headers or {}).get("Nats-Service-Error"), msg.headers
        page = _PAGE.decode(msg.data)
        pages, seen, after = pages + 1, seen + len(page.workers), page.next
        if after is None:
            passes.append(seen)
            seen = 0
    return pages, passes


@bounded(240)
async def test_a_client_looping_list_does_not_slow_folding_or_trip_the_brake(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    """Event -> bucket: the time a bucket update for a heartbeat reaches this process
    minus the time JetStream stored that heartbeat (as bench/latency.py measures it),
    while this process lists the whole fleet, page after page, as fast as it can."""
    js = nc.jetstream()
    samples: list[float] = []
    window = [float("inf"), float("inf")]

    async def on_bucket(msg: Msg) -> None:
        now = time.time()
        try:
            rec = _RECORD.decode(msg.data)
        except msgspec.DecodeError:
            return
        beat = rec.last_heartbeat if rec.event_seq == rec.last_heartbeat_seq else None
        if beat is not None and window[0] <= now <= window[1]:
            samples.append(now - beat.timestamp())

    args = ["--nats", nats_server.url, "--log-level", "warning"]
    async with registry_process(args, tmp_path / "registry.log") as reg:
        assert await reg.first_line() == nats_server.url
        incs = await register_fleet(nc, FLEET)
        beating = dict(list(incs.items())[-BEATING:])
        async with Beater(js, beating, BEAT_S) as beater:
            await eventually(lambda: _total(nc, FLEET), timeout=120, interval=0.5)
            watch = await js.subscribe(
                "$KV.workers.>", cb=on_bucket, ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.NEW, pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )  # fmt: skip
            await beater.until(2, timeout=30)
            before = await stats(nc)
            window[0] = time.time()
            pages, passes = await list_for(nc, LISTING_S)
            window[1] = time.time()
        await watch.unsubscribe()
        counters = await stats(nc)
    lat = percentiles(samples, 1000)
    lates = counters["lates_published"] - before["lates_published"]
    print(f"event->bucket {lat} ms over {pages} pages; lates {lates}")
    assert passes and all(n == FLEET for n in passes), passes  # every pass saw everyone
    assert pages >= 3 * FLEET // 500, pages  # the client really looped
    assert lat["n"] >= 300, lat
    assert counters["brake_engaged"] == 0, counters
    assert counters["expiries_published"] == before["expiries_published"], counters
    assert lat["p99"] <= P99_MS, (lat, pages, lates)


async def _total(nc: Client, count: int) -> bool:
    return (await stats(nc))["total"] == count
