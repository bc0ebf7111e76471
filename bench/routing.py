"""Router.pick() cost and the router's memory per worker, by fleet size.

The index is built the way a router builds it in production: availability
messages (one per simulated worker: its capability, default content types,
a random load, 90% available) are published to WORKER_AVAILABILITY, then a
Router follows the stream until ready(). Then:

- pick(): 20,000 calls, a mix of (capability, content type) requests, each
  timed alone with perf_counter_ns; after each, the held slot is released
  (untimed) so the index stays as it was.
- memory: tracemalloc's traced size after ready() minus before start(), in a
  second router (tracemalloc slows everything it traces, so the timing is
  done without it); RSS growth of this process during the first ready() as a
  cross-check.
"""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import psutil

from bench.common import client, fleet, nats_server, percentiles, provisioned
from registry.protocol import Availability, WorkerStatus, available_subject, encode
from registry.router import Router

REQUESTS = (
    ("gpu", "video"), ("gpu", "audio"), ("gpu", "image"), ("gpu", None),
    ("cpu", "document"), ("cpu", "text"), ("cpu", "web"), ("cpu", None),
    ("hybrid", None), ("hybrid", "video"), (None, None), (None, "text"),
)  # fmt: skip


async def publish_index(url: str, count: int) -> None:
    nc = await provisioned(url)
    f = fleet(nc, count, 5.0, seed=3)
    await f.pub.start()  # type: ignore[attr-defined]
    rng = random.Random(3)
    now = datetime.now(UTC)
    for seq, w in enumerate(f.workers, 1):
        active = rng.randrange(w.max_tasks + 1)
        a = Availability(
            worker_id=w.worker_id, available=rng.random() < 0.9 and active < w.max_tasks,
            status=WorkerStatus.ONLINE, capability=w.capability,
            supported_content_types=list(w.registration().supported_content_types),
            active_tasks=active, max_concurrent_tasks=w.max_tasks, reason="ok",
            changed_at=now, event_seq=seq,
        )  # fmt: skip
        await f.pub.publish(available_subject(w.worker_id), encode(a))
    await f.pub.settle(60.0)
    await nc.close()


async def _ready_router(url: str) -> tuple[Router, Any, float]:
    nc = await client(url, "bench-router")
    router = Router(nc, rng=random.Random(5))
    t0 = time.perf_counter()
    await router.ready()
    return router, nc, time.perf_counter() - t0


def time_picks(router: Router, n: int = 20_000) -> dict[str, Any]:
    rng = random.Random(11)
    samples: list[float] = []
    misses = 0
    clock = time.perf_counter_ns
    for _ in range(n):
        capability, content_type = rng.choice(REQUESTS)
        t0 = clock()
        picked = router.pick(capability, content_type)
        samples.append(clock() - t0)
        if picked is None:
            misses += 1
        else:
            router.release(picked.worker_id)
    return {**percentiles(samples, 0.001, 2), "unit": "us", "none_found": misses}


async def measure(count: int) -> dict[str, Any]:
    async with nats_server(f"routing{count}") as server:
        await publish_index(server.url, count)
        gc.collect()
        rss0 = psutil.Process().memory_info().rss
        router, nc, ready_s = await _ready_router(server.url)
        gc.collect()
        rss = psutil.Process().memory_info().rss - rss0
        assert len(router) == count, (len(router), count)
        picks = time_picks(router)
        await router.close()
        await nc.close()
        del router
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        router, nc, _ = await _ready_router(server.url)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        await router.close()
        await nc.close()
    return {
        "workers": count,
        "ready_s": round(ready_s, 3),
        "pick_us": picks,
        "memory_per_worker_bytes": round(traced / count),
        "rss_per_worker_bytes": round(rss / count),
    }
