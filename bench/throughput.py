"""Projector throughput at saturation, against the raw consume-plus-write limit.

One server, one preloaded WORKER_EVENTS (the simulator's registers and
heartbeats, in schedule order). Then, on that same server and data:

- raw, pipelined: a pull consumer defined exactly like the projector's
  (nats/consumers/registry-projector.json, ack policy `all`), fetch 512, one
  KV write per event (`js.publish_async` to `$KV.<bucket>.<id>`, the event
  body as the value), await the batch's PubAcks, ack the batch's last message.
  No decoding, no fold, no availability messages. Run before and after the
  projector; the better of the two is the limit.
- the projector: `registry.server.app.Registry` started on the preloaded stream,
  timed until its counters show the last event folded.
- raw, straightforward: the same consumer, `await kv.put(...)` per event, on
  the first events only (it is slow; the rate is what counts).
- raw, lean: what a Python consumer on the same client can reach when it
  avoids nats-py's per-message helpers: pull requests kept open ahead of need
  into a local queue (no `fetch()`), and each KV write a core publish with a
  reply subject, the PubAcks counted on one subscription (no futures). This is
  the ceiling, not the yardstick: the ratio is taken against the pipelined run.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any

import structlog

from bench.common import client, fleet, nats_server, preload, provisioned, stream_state, until
from registry import logs
from registry.server.app import Registry
from registry.server.provision import Names, api, consumer_config, ensure_stream, stream_configs
from registry.server.settings import RegistrySettings

EVENTS = "WORKER_EVENTS"
BATCH = 512


async def _raw_setup(nc: Any, name: str) -> Any:
    """A bucket `name` like `workers`, and a consumer `name` like the projector's."""
    names = Names(bucket=name, consumer=name)
    await ensure_stream(nc, stream_configs(names)[2])
    body = {"stream_name": EVENTS, "config": consumer_config(names, 1)}
    resp = await api(nc, f"CONSUMER.CREATE.{EVENTS}.{name}", body)
    if "error" in resp:
        raise RuntimeError(f"cannot create consumer {name}: {resp['error']}")
    return await nc.jetstream().pull_subscribe_bind(durable=name, stream=EVENTS)


async def raw(url: str, count: int, name: str, pipelined: bool) -> dict[str, Any]:
    """Consume `count` events and write each to a bucket; events per second."""
    nc = await client(url, f"bench-{name}")
    js = nc.jetstream(publish_async_max_pending=20_000)
    try:
        psub = await _raw_setup(nc, name)
        kv = await js.key_value(name)
        prefix = f"$KV.{name}."
        done, t0 = 0, time.perf_counter()
        while done < count:
            msgs = await psub.fetch(min(BATCH, count - done), timeout=5.0)
            if pipelined:
                futures = [
                    await js.publish_async(prefix + m.subject.rpartition(".")[2], m.data)
                    for m in msgs
                ]
                for f in futures:
                    await f
            else:
                for m in msgs:
                    await kv.put(m.subject.rpartition(".")[2], m.data)
            await msgs[-1].ack()
            done += len(msgs)
        seconds = time.perf_counter() - t0
    finally:
        await nc.close()
    return {"events": done, "seconds": round(seconds, 3), "rate": round(done / seconds)}


async def raw_lean(url: str, count: int, name: str) -> dict[str, Any]:
    """Continuous pull + pipelined core publishes with counted PubAcks."""
    nc = await client(url, f"bench-{name}")
    try:
        await _raw_setup(nc, name)
        queue: collections.deque[Any] = collections.deque()
        wake = asyncio.Event()
        state = {"outstanding": 0, "acked": 0}
        inbox, acks = nc.new_inbox(), nc.new_inbox()

        async def on_msg(msg: Any) -> None:
            status = msg.headers.get("Status") if msg.headers else None
            if status is None:
                state["outstanding"] -= 1
                queue.append(msg)
            elif status == "408":
                state["outstanding"] -= int(msg.headers.get("Nats-Pending-Messages", 0))
            wake.set()

        async def on_ack(msg: Any) -> None:
            state["acked"] += 1
            wake.set()

        await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await nc.subscribe(acks, cb=on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1)
        pull = f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS}.{name}"
        request = json.dumps({"batch": BATCH, "expires": 5_000_000_000}).encode()
        prefix, done, t0 = f"$KV.{name}.", 0, time.perf_counter()
        while done < count:
            if state["outstanding"] < BATCH:
                state["outstanding"] += BATCH
                await nc.publish(pull, request, reply=inbox)
            while not queue:
                wake.clear()
                await asyncio.wait_for(wake.wait(), 5.0)
            msgs = [queue.popleft() for _ in range(min(BATCH, len(queue), count - done))]
            target = state["acked"] + len(msgs)
            for m in msgs:
                await nc.publish(prefix + m.subject.rpartition(".")[2], m.data, reply=acks)
            while state["acked"] < target:
                wake.clear()
                await asyncio.wait_for(wake.wait(), 5.0)
            await msgs[-1].ack()
            done += len(msgs)
        seconds = time.perf_counter() - t0
    finally:
        await nc.close()
    return {"events": done, "seconds": round(seconds, 3), "rate": round(done / seconds)}


async def projector(url: str, last_seq: int, timeout_s: float) -> dict[str, Any]:
    """Start a Registry on the preloaded stream; time until the last event is folded."""
    nc = await client(url, "bench-projector")
    registry = Registry(nc, RegistrySettings(nats_url=url))
    counters = registry.projector.counters
    t0 = time.perf_counter()
    task = asyncio.create_task(registry.run())
    try:
        await until(lambda: counters.last_seq >= last_seq, timeout_s, every_s=0.005)
        seconds = time.perf_counter() - t0
        result = registry.counters()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()
    folded = last_seq
    return {
        "events": folded, "seconds": round(seconds, 3), "rate": round(folded / seconds),
        "bucket_writes": result["bucket_writes"],
        "availability_published": result["availability_published"],
        "events_applied": result["events_applied"],
    }  # fmt: skip


async def measure(
    workers: int, rounds: int, straight_max: int, profile: Any = None
) -> dict[str, Any]:
    """All four runs on one server; `profile` wraps the projector run (py-spy)."""
    logs.configure("warning", json=True)
    async with nats_server("throughput") as server:
        nc = await provisioned(server.url)
        t0 = time.perf_counter()
        f = fleet(nc, workers, 5.0)
        total = await preload(f, rounds)
        preload_s = time.perf_counter() - t0
        state = await stream_state(nc, EVENTS)
        await nc.close()
        assert state.messages == total, (state.messages, total)
        raw1 = await raw(server.url, total, "raw_a", pipelined=True)
        if profile is not None:
            async with profile:
                proj = await projector(server.url, state.last_seq, 600.0)
        else:
            proj = await projector(server.url, state.last_seq, 600.0)
        raw2 = await raw(server.url, total, "raw_b", pipelined=True)
        straight = await raw(server.url, min(total, straight_max), "raw_c", pipelined=False)
        lean = await raw_lean(server.url, total, "raw_d")
    limit = max(raw1["rate"], raw2["rate"])
    structlog.get_logger("bench").info(
        "throughput_measured", workers=workers, projector=proj["rate"], raw=limit
    )
    return {
        "workers": workers,
        "events": total,
        "mix": {"register": workers, "heartbeat": workers * rounds},
        "preload_rate": round(total / preload_s),
        "projector": proj,
        "raw_pipelined": [raw1, raw2],
        "raw_straightforward": straight,
        "raw_lean": lean,
        "ratio_to_pipelined": round(proj["rate"] / limit, 3),
        "ratio_to_straightforward": round(proj["rate"] / straight["rate"], 3),
        "ratio_to_lean": round(proj["rate"] / lean["rate"], 3),
    }
