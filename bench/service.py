"""The query service at scale: registry.pick, registry.stats and one registry.list page.

A fleet of simulated workers (the simulator's profiles, a random load, 90%
available, 5% offline records) is held as the registry holds it: a Catalog
(registry.catalog) behind the `worker-registry` service on a nats-server. Then:

- through the service: each request timed alone from this process (request,
  the service's work, the answer's transfer and msgspec decoding: a round
  trip; the list page is the first page of 500, every time);
- in process, the same answers computed two ways: from the catalog (what the
  service does now) and by the scan it replaced (query.pick, query.stats, and
  query.select plus encoding for the whole unpaged listing);
- Router.pick on an AvailabilityIndex of the same fleet, for scale.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.client import Client

from agent.simulate import Fleet, SimSettings
from bench.common import client, nats_server, percentiles
from bench.routing import REQUESTS
from registry import protocol, query
from registry.catalog import Catalog
from registry.fold import availability, is_available
from registry.protocol import (
    OfflineReason,
    WorkerCapability,
    WorkerInfo,
    WorkerMetrics,
    WorkerStatus,
)
from registry.router.index import AvailabilityIndex
from registry.server.provision import provision
from registry.server.service import EXAMINED_MAX, page, start_service

PICKS = [(WorkerCapability(c) if c else None, t) for c, t in REQUESTS]


class FleetView:
    """What the registry hands the service, for a fixed fleet."""

    def __init__(self, records: list[WorkerInfo]) -> None:
        self._catalog = Catalog(records)

    def records(self) -> Mapping[str, WorkerInfo]:
        return self._catalog.records

    def catalog(self) -> Catalog:
        return self._catalog

    def counters(self) -> Mapping[str, int | float]:
        return {"events_applied": 0, "pending": 0}


def fleet_records(count: int, seed: int = 3) -> list[WorkerInfo]:
    f = Fleet(SimSettings(count=count, seed=seed, id_prefix="sim"), publisher=None)  # type: ignore[arg-type]
    rng, now = random.Random(seed), datetime.now(UTC)
    out = []
    for seq, w in enumerate(f.workers, 1):
        active = rng.randrange(w.max_tasks + 1)
        offline = rng.random() < 0.05
        status = WorkerStatus.ONLINE if rng.random() < 0.9 else WorkerStatus.MAINTENANCE
        out.append(WorkerInfo(
            registration=w.registration(), status=WorkerStatus.OFFLINE if offline else status,
            metrics=WorkerMetrics(cpu_usage_percent=20.0, memory_usage_percent=30.0,
                                  active_tasks=active),
            last_heartbeat=now, registered_at=now, event_seq=seq, incarnation="i",
            available=not offline and is_available(status, True, active, w.max_tasks),
            offline_reason=OfflineReason.EXPIRED if offline else None,
            offline_at=now if offline else None,
        ))  # fmt: skip
    return out


def timed(fn: Callable[[], object], n: int) -> dict[str, Any]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return {**percentiles(samples, 0.001, 1), "unit": "us"}


async def timed_requests(nc: Client, bodies: Callable[[int], tuple[str, bytes]], n: int) -> Any:
    samples, sizes = [], []
    for i in range(n):
        subject, body = bodies(i)
        t0 = time.perf_counter_ns()
        msg = await nc.request(subject, body, timeout=5.0)
        msgspec.json.decode(msg.data)
        samples.append(time.perf_counter_ns() - t0)
        assert not (msg.headers or {}).get("Nats-Service-Error"), msg.headers
        sizes.append(len(msg.data))
    return {**percentiles(samples, 0.001, 1), "unit": "us", "answer_bytes_max": max(sizes)}


def in_process(records: list[WorkerInfo], catalog: Catalog) -> dict[str, Any]:
    rng = random.Random(11)
    index = AvailabilityIndex(rng=random.Random(5))
    for r in records:
        index.update(availability(r))

    def router_pick() -> None:
        c, t = rng.choice(REQUESTS)
        a = index.pick(c, t)
        if a is not None:
            index.release(a.worker_id)

    def old_list() -> None:
        protocol.encode({"workers": query.select(records, query.Filter())})

    def one_page() -> None:
        page(catalog.after(None), query.Filter(), 500, 1 << 20, catalog.is_last, EXAMINED_MAX)

    return {
        "pick_catalog": timed(lambda: catalog.pick(*rng.choice(PICKS)), 20_000),
        "pick_scan": timed(lambda: query.pick(records, *rng.choice(PICKS)), 200),
        "router_pick": timed(router_pick, 20_000),
        "stats_catalog": timed(catalog.stats, 20_000),
        "stats_scan": timed(lambda: query.stats(records), 200),
        "list_page_500": timed(one_page, 200),
        "list_unpaged_select_and_encode": timed(old_list, 20),
    }


async def measure(count: int) -> dict[str, Any]:
    records = fleet_records(count)
    view = FleetView(records)
    local = in_process(records, view.catalog())
    async with nats_server(f"service{count}") as server:
        nc = await client(server.url, "bench-service")
        await provision(nc)
        service = await start_service(nc, view)
        rng = random.Random(13)
        cursor: list[str | None] = [None]

        def pick(_: int) -> tuple[str, bytes]:
            c, t = rng.choice(REQUESTS)
            return "registry.pick", json.dumps({"capability": c, "content_type": t}).encode()

        def list_page(_: int) -> tuple[str, bytes]:
            return "registry.list", json.dumps({"limit": 500, "after": cursor[0]}).encode()

        try:
            over_nats = {
                "pick": await timed_requests(nc, pick, 2000),
                "stats": await timed_requests(nc, lambda _: ("registry.stats", b"{}"), 2000),
                "list_page_500": await timed_requests(nc, list_page, 200),
            }
        finally:
            await service.stop()
            await nc.close()
    return {"workers": count, "over_nats": over_nats, "in_process": local, "ratios": {
        "pick_scan_over_catalog": round(local["pick_scan"]["p50"] / local["pick_catalog"]["p50"]),
        "pick_catalog_over_router": round(
            local["pick_catalog"]["p50"] / local["router_pick"]["p50"], 2),
        "stats_scan_over_catalog": round(local["stats_scan"]["p50"] / local["stats_catalog"]["p50"]),
    }}  # fmt: skip
