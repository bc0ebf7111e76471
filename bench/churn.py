"""Churn without growth: many distinct worker ids come and go; memory and streams come back.

Two runs, each on a fresh nats-server on 127.0.0.1 with the registry
(bench/registry_proc.py) and a router (bench/router_proc.py) in processes of
their own, so their resident memory is theirs alone:

- baseline: a steady live fleet (LIVE workers beating every 5 s) and nothing
  else: what a registry that only ever saw the live fleet holds;
- churn: the same live fleet, measured once it is folded (`start`); then CHURN
  distinct worker ids, in WAVES waves (half each, by default), register over
  CHURN_S seconds in all, each beats every 5 s for a lifetime drawn from
  LIFE_S, and then unregisters, or (a SILENT share) falls silent and is expired
  15 s later; every id is purged `retention_s` after it went offline, while the
  live fleet and the other churners keep the events flowing. After each wave,
  once every id of it is purged and its markers' TTL has run out, it is
  measured; the last is `end`. The maxima seen meanwhile are `peak`. A second
  wave that ends where the first did shows that what is left after a wave is
  a high-water mark (memory the allocator keeps for reuse), not growth.

Each measure (`start`, `end`, `baseline`) is a status line taken after a full
collection in each child: the registry's RSS, Python's allocated memory blocks
(`sys.getallocatedblocks()`: records are msgspec structs the cyclic GC does
not track, so they are counted by the blocks they take, and by the sizes of
the structures that hold them), the router's index, RSS and blocks; and the
stored messages and bytes of KV_workers, WORKER_AVAILABILITY and WORKER_EVENTS
(the history, kept by design: bounded per worker id, not purged). The figures
that matter are end / baseline: 1.0 means nothing of the churned ids is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from agent.simulate.fleet import Fleet
from agent.simulate.worker import DOWN
from bench.common import RegistryProcess, fleet, nats_server, provisioned, stream_state

ROUTER_PROC = Path(__file__).resolve().parent / "router_proc.py"
INTERVAL_S = 5.0
STREAMS = {"bucket": "KV_workers", "availability": "WORKER_AVAILABILITY", "events": "WORKER_EVENTS"}


class Driver:
    """Beats the live fleet on its schedule; registers the churners on a timeline, beats
    them while they live, and ends each (unregister, or silence)."""

    def __init__(self, live: Fleet, churners: Fleet | None) -> None:
        self.live, self.churners = live, churners
        self.timeline: list[tuple[float, int, str]] = []
        self.registered = self.ended = 0
        self.churning = False  # the churners' schedule starts with plan()

    def plan(self, start: float, churn_s: float, life_s: tuple[float, float], silent: float,
             rng: random.Random, ids: range) -> float:  # fmt: skip
        """The register and end of churners `ids`; returns when the last one ends."""
        assert self.churners is not None
        n, last = len(ids), start
        for k, i in enumerate(ids):
            at = start + churn_s * k / n
            end = at + rng.uniform(*life_s)
            heapq.heappush(self.timeline, (at, i, "register"))
            heapq.heappush(self.timeline, (end, i, "silent" if rng.random() < silent else "leave"))
            last = max(last, end)
        if not self.churning:
            self.churners.start(start)
            self.churners.schedule.issued = 0  # beats count from `start`
            self.churning = True
        return last

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            await self.live.step(now)
            if self.churners is not None and self.churning:
                await self._churn(now, self.churners)
            await asyncio.sleep(0.05)

    async def _churn(self, now: float, f: Fleet) -> None:
        while self.timeline and self.timeline[0][0] <= now:
            _, i, action = heapq.heappop(self.timeline)
            w = f.workers[i]
            if action == "register":
                await f.register(w)  # ALIVE: the schedule beats it from now on
                self.registered += 1
                continue
            if action == "leave":
                await f.unregister(w, "churn")
            w.state = DOWN  # either way no beat again, and no coming back
            self.ended += 1
        await f.step(now)


async def _streams(nc: Client) -> dict[str, dict[str, int]]:
    out = {}
    for key, stream in STREAMS.items():
        state = await stream_state(nc, stream)
        out[key] = {"messages": state.messages, "bytes": state.bytes}
    return out


async def _measure(nc: Client, registry: RegistryProcess, router: RegistryProcess) -> dict[str, Any]:
    reg, rt = await registry.measure(), await router.measure()
    return {
        "registry": {"records": reg["records"], "rss_mib": _mib(reg["rss_untrimmed"]),
                     "rss_trimmed_mib": _mib(reg["rss_trimmed"]), "heap_blocks": reg["heap_blocks"],
                     "held": reg["held"]},
        "router": {"workers": rt["workers"], "rss_mib": _mib(rt["rss_untrimmed"]),
                   "rss_trimmed_mib": _mib(rt["rss_trimmed"]), "heap_blocks": rt["heap_blocks"],
                   "profiles": rt["profiles"]},
        **await _streams(nc),
    }  # fmt: skip


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


class Peak:
    """The largest figures seen while the churn runs (sampled every second)."""

    def __init__(self) -> None:
        self.figures: dict[str, float] = {}

    def see(self, name: str, value: float) -> None:
        self.figures[name] = max(value, self.figures.get(name, value))

    async def sample(self, nc: Client, registry: RegistryProcess, router: RegistryProcess) -> None:
        while True:
            r, t = registry.latest, router.latest
            for name, value in (
                ("registry_records", r.get("records", 0)), ("registry_rss_mib", r.get("rss", 0) / 2**20),
                ("registry_heap_blocks", r.get("heap_blocks", 0)), ("lag_s", r.get("lag_s", 0.0)),
                ("pending", r.get("pending", 0)), ("router_workers", t.get("workers", 0)),
                ("router_rss_mib", t.get("rss", 0) / 2**20),
                ("router_heap_blocks", t.get("heap_blocks", 0)),
            ):  # fmt: skip
                self.see(name, value)
            for key, s in (await _streams(nc)).items():
                self.see(f"{key}_messages", s["messages"])
                self.see(f"{key}_bytes", s["bytes"])
            await asyncio.sleep(1.0)


async def _run(
    label: str, live: int, churn: int, churn_s: float, life_s: tuple[float, float],
    silent: float, settings: dict[str, Any], drain_timeout_s: float, waves: int = 1,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    async with nats_server(f"churn-{label}") as server:
        nc = await provisioned(server.url)
        registry = RegistryProcess(server.url, every_s=0.5, settings=settings)
        router = RegistryProcess(server.url, every_s=0.5, script=ROUTER_PROC)
        await registry.start()
        await router.start()
        steady = fleet(nc, live, INTERVAL_S, seed=11, prefix="live")
        churners = fleet(nc, churn, INTERVAL_S, seed=12, prefix="churn") if churn else None
        for f in (steady, churners):
            if f is not None:
                await f.pub.start()  # type: ignore[attr-defined]
        driver = Driver(steady, churners)
        task: asyncio.Task[None] | None = None
        try:
            await registry.wait_for(lambda s: s["caught_up"], 60.0)
            await router.wait_for(lambda s: s["ready"], 60.0)
            await steady.register_all(time.monotonic())
            task = asyncio.create_task(driver.run())
            await registry.wait_for(lambda s: s["records"] >= live and s["caught_up"], 120.0)
            await router.wait_for(lambda s: s["workers"] >= live, 60.0)
            await asyncio.sleep(INTERVAL_S + 1.0)  # every live worker has beaten
            out["start"] = await _measure(nc, registry, router)
            if churners is None:
                return out
            out.update(await _churn(nc, registry, router, driver, live, churn_s, life_s, silent,
                                    drain_timeout_s, waves))  # fmt: skip
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await router.stop()
            await registry.stop()
            await nc.close()
    return out


async def _churn(
    nc: Client, registry: RegistryProcess, router: RegistryProcess, driver: Driver, live: int,
    churn_s: float, life_s: tuple[float, float], silent: float, drain_timeout_s: float,
    waves: int,
) -> dict[str, Any]:  # fmt: skip
    """`waves` waves of distinct ids, each over churn_s / waves, each drained and measured."""
    assert driver.churners is not None
    churn = len(driver.churners.workers)
    t0 = time.monotonic()
    peak = Peak()
    sampler = asyncio.create_task(peak.sample(nc, registry, router))
    rng, measures, timeline = random.Random(13), [], []
    try:
        for wave in range(waves):
            ids = range(churn * wave // waves, churn * (wave + 1) // waves)
            last_end = driver.plan(time.monotonic(), churn_s / waves, life_s, silent, rng, ids)
            await asyncio.sleep(max(0.0, last_end - time.monotonic()))
            churned_s = time.monotonic() - t0
            await registry.wait_for(lambda s, n=ids.stop: s["offline_purged"] >= n, drain_timeout_s)
            purged_s = time.monotonic() - t0
            drained = await _drained(nc, live, drain_timeout_s)
            await router.wait_for(lambda s: s["workers"] == live, 30.0)
            await asyncio.sleep(2.5)  # the registry forgets a marker's revision 2 s after its TTL
            measures.append(await _measure(nc, registry, router))
            timeline.append({"ids": ids.stop - ids.start, "churned": round(churned_s, 1),
                             "all_purged": round(purged_s, 1), "drained": drained,
                             "measured": round(time.monotonic() - t0, 1)})  # fmt: skip
    finally:
        sampler.cancel()
    counters = registry.latest
    return {
        "peak": {k: round(v, 2) for k, v in peak.figures.items()},
        "waves": measures, "end": measures[-1], "timeline_s": timeline,
        "counters": {k: counters.get(k) for k in (
            "events_applied", "events_ignored", "offline_purged", "expiries_published",
            "lates_published", "availability_published", "resyncs", "foreign_writes_repaired")},
        "registered": driver.registered, "ended": driver.ended,
    }  # fmt: skip


async def _drained(nc: Client, live: int, timeout_s: float) -> bool:
    """Until the bucket and the availability stream hold the live fleet only (the markers'
    TTL ran out and the server removed them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = await _streams(nc)
        if s["bucket"]["messages"] == live and s["availability"]["messages"] == live:
            return True
        await asyncio.sleep(0.5)
    return False


def _ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """a / b for each figure both measures have."""
    pairs = {
        "registry_records": (a["registry"]["records"], b["registry"]["records"]),
        "registry_rss": (a["registry"]["rss_mib"], b["registry"]["rss_mib"]),
        "registry_rss_trimmed": (a["registry"]["rss_trimmed_mib"], b["registry"]["rss_trimmed_mib"]),
        "registry_heap_blocks": (a["registry"]["heap_blocks"], b["registry"]["heap_blocks"]),
        "router_workers": (a["router"]["workers"], b["router"]["workers"]),
        "router_rss": (a["router"]["rss_mib"], b["router"]["rss_mib"]),
        "router_rss_trimmed": (a["router"]["rss_trimmed_mib"], b["router"]["rss_trimmed_mib"]),
        "router_heap_blocks": (a["router"]["heap_blocks"], b["router"]["heap_blocks"]),
        **{f"{k}_{m}": (a[k][m], b[k][m]) for k in STREAMS for m in ("messages", "bytes")},
    }
    return {k: round(x / y, 3) if y else None for k, (x, y) in pairs.items()}


async def measure(
    live: int = 2000, churn: int = 20000, churn_s: float = 60.0,
    life_s: tuple[float, float] = (5.0, 20.0), silent: float = 0.25,
    retention_s: float = 10.0, marker_ttl_s: int = 5, drain_timeout_s: float = 120.0,
    waves: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """The baseline run, then the churn run; ratios end / baseline and end / start."""
    settings = {"retention_s": retention_s, "purge_marker_ttl_s": marker_ttl_s,
                "brake_fraction": 1.0}  # fmt: skip
    base = await _run("baseline", live, 0, 0.0, life_s, silent, settings, drain_timeout_s)
    run = await _run("churn", live, churn, churn_s, life_s, silent, settings, drain_timeout_s,
                     waves)
    return {
        "live": live, "churn": churn, "churn_s": churn_s, "life_s": list(life_s),
        "silent_share": silent, "interval_s": INTERVAL_S, "settings": settings,
        "baseline": base["start"], "start": run["start"], **{k: v for k, v in run.items() if k != "start"},
        "end_over_baseline": _ratios(run["end"], base["start"]),
        "end_over_start": _ratios(run["end"], run["start"]),
        "end_over_first_wave": _ratios(run["end"], run["waves"][0]),
    }  # fmt: skip
