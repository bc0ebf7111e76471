"""Churn without growth: thousands of worker ids come and go under steady load; once
their records are purged after retention, the registry (projector, catalog, sweeper),
a standby's view, the routers, the bucket and the availability stream hold the live
fleet again, and nothing more."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from registry.protocol import PURGED
from registry.router import Router
from registry.server.app import Registry
from registry.server.embedded import NatsServer
from registry.server.follower import Follower
from tests.conftest import eventually, stop_task
from tests.integration.registry_helpers import (
    AVAILABILITY,
    BUCKET,
    bounded,
    heartbeat_body,
    new_incarnation,
    register_body,
    running_registry,
    unregister_body,
)

STEADY = 150  # beat every BEAT_S throughout
BEAT_S = 0.5
CHURN = 2400  # distinct ids: register, beat once, then leave (2 in 3) or fall silent
CHURN_S = 6.0  # spread over this long
RETURNING = 50  # of the first leavers: register again near the end, and stay
SILENT_INTERVAL_S = 0.5  # the silent ones expire 3 intervals after their beat


@dataclass(order=True)
class _Event:
    at: float
    kind: str = field(compare=False)
    wid: str = field(compare=False)
    body: dict[str, Any] = field(compare=False)


def churn_plan() -> list[_Event]:
    """Every churning worker's events, by when they are due (seconds from the start)."""
    plan = []
    for i in range(CHURN):
        wid, inc, t = f"churn-{i:05d}", new_incarnation(), i * CHURN_S / CHURN
        silent = i % 3 == 2
        interval = SILENT_INTERVAL_S if silent else 30.0
        plan.append(_Event(t, "register", wid, register_body(
            wid, inc, heartbeat_interval_s=interval, capability="cpu",
            supported_content_types=["text"])))  # fmt: skip
        plan.append(_Event(t + 0.3, "heartbeat", wid, heartbeat_body(wid, inc)))
        if not silent:
            plan.append(_Event(t + 0.6, "unregister", wid, unregister_body(wid, inc)))
    for wid in returning():
        plan.append(_Event(CHURN_S + 0.5, "register", wid, register_body(wid, new_incarnation())))
    return sorted(plan)


def returning() -> list[str]:
    return [f"churn-{i:05d}" for i in range(3 * RETURNING) if i % 3 != 2][:RETURNING]


class Load:
    """Publishes the steady fleet's heartbeats every BEAT_S and the churn plan on time,
    each tick's events concurrently (acknowledged), until stopped."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.steady = {f"steady-{i:03d}": new_incarnation() for i in range(STEADY)}
        self.plan = churn_plan()
        self.published = 0
        self.churn_done = asyncio.Event()

    async def register_steady(self) -> None:
        await asyncio.gather(*(self._send("register", wid, register_body(
            wid, inc, heartbeat_interval_s=1.0)) for wid, inc in self.steady.items()))  # fmt: skip

    async def run(self) -> None:
        start, beat_at, nxt = time.monotonic(), 0.0, 0
        while True:
            now = time.monotonic() - start
            sends = []
            if now >= beat_at:
                beat_at += BEAT_S
                sends += [self._send("heartbeat", w, heartbeat_body(w, inc))
                          for w, inc in self.steady.items()]  # fmt: skip
            while nxt < len(self.plan) and self.plan[nxt].at <= now:
                e = self.plan[nxt]
                sends.append(self._send(e.kind, e.wid, e.body))
                nxt += 1
            await asyncio.gather(*sends)
            if nxt == len(self.plan):
                self.churn_done.set()
            await asyncio.sleep(0.02)

    async def _send(self, kind: str, wid: str, body: dict[str, Any]) -> None:
        await self.js.publish(f"worker.{kind}.{wid}", json.dumps(body).encode())
        self.published += 1


async def _messages(js: JetStreamContext, stream: str) -> int:
    return (await js.stream_info(stream)).state.messages


def _projector_holds(reg: Registry, live: set[str]) -> bool:
    p, s = reg.projector, reg.sweeper
    return (
        set(p.entries) == live and set(p.catalog.records) == live and len(p.offline) == 0
        and len(p.markers) == 0 and set(s.heap._current) <= live and set(s._silent) <= live
    )  # fmt: skip


@bounded(60)
async def test_churned_workers_leave_registry_routers_bucket_and_stream(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    load = Load(js)
    live = set(load.steady) | set(returning())
    async with running_registry(
        nats_server.url, retention_s=1.0, purge_marker_ttl_s=1, brake_fraction=1.0,
        caught_up=True,
    ) as reg:  # fmt: skip
        await load.register_steady()
        router = await Router.connect(nats_server.url)
        await router.ready()
        standby = Follower(nc)  # a standby registry's view of the bucket
        following = asyncio.create_task(standby.run())
        task = asyncio.create_task(load.run())
        try:
            # purges while events flow: both counters move between samples
            samples: list[tuple[int, int]] = []
            while not load.churn_done.is_set():
                c = reg.counters()
                samples.append((int(c["events_applied"]), int(c["offline_purged"])))
                await asyncio.sleep(0.25)
            busy = [b for a, b in itertools.pairwise(samples) if b[0] > a[0] and b[1] > a[1]]
            assert len(busy) >= 2, samples
            gone = CHURN  # every churned id was purged once (the returning ones too)
            await eventually(lambda: reg.counters()["offline_purged"] >= gone, timeout=20)
            await eventually(lambda: _projector_holds(reg, live), timeout=15)
            await eventually(lambda: set(router.snapshot()) == live, timeout=10)
            await eventually(lambda: set(standby.records()) == live, timeout=10)
            assert router.forgotten >= CHURN - RETURNING
            await eventually(lambda: _messages_are(js, len(live)), timeout=15)
            assert task.done() is False, "the steady load ran throughout"
            assert reg.counters()["expiries_published"] >= CHURN // 3
            late = await Router.connect(nats_server.url)
            async with late:
                assert set(late.snapshot()) == live  # never heard of the churned ids
                assert late.forgotten == 0
        finally:
            await stop_task(task, "the load")
            await stop_task(following, "the follower")
            await router.close()
    assert all(a.reason != PURGED for a in router.snapshot().values())


async def _messages_are(js: JetStreamContext, live: int) -> bool:
    """The bucket and the availability stream hold one message per live worker."""
    kv, avail = await _messages(js, f"KV_{BUCKET}"), await _messages(js, AVAILABILITY)
    return kv == live and avail == live
