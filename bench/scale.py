"""Scale: registry memory per tracked worker, cold start, bytes per worker.

- memory: the registry runs in its own process (bench/registry_proc.py); the
  fleet registers and beats once, in steps up to each size, and the
  registry's resident memory (RSS) is read once everything is folded. Per
  worker = (RSS at N - RSS with an empty bucket) / N.
- cold start: with the largest fleet in the bucket the registry process is
  stopped and a new one started; timed from its launch (interpreter start
  included) until it reports caught up and its sweeper judging.
- bytes per worker: the bucket's and the availability stream's stored bytes
  divided by the fleet; WORKER_EVENTS after "a day" is bounded by the
  per-subject limit (max_msgs_per_subject), not by time, so a sample of
  workers is driven past it (a register and limit + 50 heartbeats each) and
  the stored bytes per worker are read off; the worst case (a worker that also
  restarted and expired more than `limit` times) is measured the same way.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import RegistryProcess, fleet, nats_server, preload, provisioned, stream_state
from registry import definitions
from registry.protocol import ExpiredEvent, encode, event_subject

LIMIT = definitions.load("streams/WORKER_EVENTS.json")["max_msgs_per_subject"]


def _folded(target_seq: int, records: int) -> Any:
    def check(s: dict[str, Any]) -> bool:
        return bool(s["caught_up"] and s["last_seq"] >= target_seq and s["records"] >= records)

    return check


async def memory_and_cold_start(sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": []}
    async with nats_server("scale") as server:
        nc = await provisioned(server.url)
        registry = RegistryProcess(server.url, every_s=0.05)
        await registry.start()
        await registry.wait_for(lambda s: s["caught_up"], 30.0)
        await asyncio.sleep(0.5)
        base = registry.latest["rss"]
        out["empty_rss_mib"] = round(base / 2**20, 1)
        f = fleet(nc, max(sizes), 600.0, seed=5)  # a long interval: nobody goes late meanwhile
        await f.pub.start()  # type: ignore[attr-defined]
        done = 0
        for size in sizes:
            t0 = time.monotonic()
            for w in f.workers[done:size]:
                await f.register(w)
            for w in f.workers[done:size]:
                await f.heartbeat(w)
            await f.pub.settle(120.0)
            last = (await stream_state(nc, "WORKER_EVENTS")).last_seq
            t1 = await registry.wait_for(_folded(last, size), 900.0)
            await asyncio.sleep(0.3)
            rss = registry.latest["rss"]
            kv = await stream_state(nc, "KV_workers")
            avail = await stream_state(nc, "WORKER_AVAILABILITY")
            out["sizes"].append({
                "workers": size,
                "rss_mib": round(rss / 2**20, 1),
                "rss_per_worker_bytes": round((rss - base) / size),
                "fold_rate": round(2 * (size - done) / (t1 - t0)),
                "bucket_bytes_per_worker": round(kv.bytes / size),
                "availability_bytes_per_worker": round(avail.bytes / size),
            })  # fmt: skip
            done = size
        await registry.stop()
        restarted = RegistryProcess(server.url, every_s=0.01)
        await restarted.start()
        t = await restarted.wait_for(lambda s: s["caught_up"] and s["sweeping"], 120.0)
        out["cold_start"] = {
            "workers": done,
            "seconds": round(t - restarted.started_at, 2),
            "rss_after_mib": round(restarted.latest["rss"] / 2**20, 1),
        }
        await restarted.stop()
        await nc.close()
    return out


async def stream_bytes(sample: int = 200, worst_sample: int = 20) -> dict[str, Any]:
    """WORKER_EVENTS bytes per worker once the per-subject limit holds."""
    async with nats_server("bytes") as server:
        nc = await provisioned(server.url)
        f = fleet(nc, sample, 5.0, seed=9)
        await preload(f, LIMIT + 50)
        typical = await stream_state(nc, "WORKER_EVENTS")
        w = fleet(nc, worst_sample, 5.0, seed=10, prefix="worst")
        await preload(w, LIMIT + 50)
        for _ in range(LIMIT + 10):
            for sw in w.workers:
                sw.new_life()
                await w.register(sw)
                await w.unregister(sw, "restart")
                await w.pub.publish(event_subject("expired", sw.worker_id), _expired(sw.worker_id))
        await w.pub.settle(60.0)
        both = await stream_state(nc, "WORKER_EVENTS")
        store = _du(server.data_dir / "jetstream")
        await nc.close()
    per_worker = typical.bytes / sample
    worst = (both.bytes - typical.bytes) / worst_sample
    return {
        "max_msgs_per_subject": LIMIT,
        "sample_workers": sample,
        "messages_per_worker": round(typical.messages / sample, 1),
        "bytes_per_worker": round(per_worker),
        "worst_case_messages_per_worker": round(
            (both.messages - typical.messages) / worst_sample, 1
        ),
        "worst_case_bytes_per_worker": round(worst),
        "store_on_disk_bytes": store,
        "day_at_5s_heartbeats": 86400 // 5,
        "extrapolated_mib": {
            str(n): round(per_worker * n / 2**20, 1) for n in (1000, 10000, 100000)
        },
        "extrapolated_worst_mib": {
            str(n): round(worst * n / 2**20, 1) for n in (1000, 10000, 100000)
        },
    }


def _expired(worker_id: str) -> bytes:
    now = datetime.now(UTC)
    return encode(ExpiredEvent(worker_id=worker_id, last_heartbeat=now - timedelta(seconds=15),
                               timeout_s=15.0, detected_at=now))  # fmt: skip


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += (Path(root) / name).stat().st_size
    return total
