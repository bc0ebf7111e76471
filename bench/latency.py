"""A steady fleet: event -> bucket and change -> router latency, and failure detection.

Four processes on the machine: nats-server, the registry (bench/registry_proc.py),
the fleet (`python -m agent.simulate`, so its CPU does not disturb the
observer), and this one, which watches the bucket and runs a Router.

Every time is JetStream's stored time or this machine's wall clock (one
clock: everything runs on this machine):

- event -> bucket: a bucket update whose record was last changed by a
  heartbeat (`event_seq == last_heartbeat_seq`): the time this process
  received the update minus `last_heartbeat` (the time JetStream stored that
  heartbeat). `stored` variant: the bucket entry's own stored time instead.
- event -> router: an availability change taken into the Router's index:
  arrival minus `changed_at` (the stored time of the event that caused it).
- availability -> router: arrival minus the stored time of the availability
  message itself (the hop from the projector's publish to the router).
- detection: for every worker the simulator killed (`--kill`), the moment the
  Router took its `expired` availability, minus its last heartbeat's stored
  time, minus its timeout (max(1 s, 3 x interval)); and, before that, when the
  Router first saw it unavailable (`late`, after 1.5 intervals by default),
  counted from its last heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import psutil
from nats.aio.msg import Msg
from nats.js import api

from bench.common import (
    ROOT,
    RegistryProcess,
    client,
    cpu_seconds,
    nats_server,
    percentiles,
    provisioned,
)
from registry.protocol import AVAILABILITY_DECODER, Availability
from registry.router import Router

TIMEOUT_FLOOR_S = 1.0
TIMEOUT_FACTOR = 3.0


class _Record(msgspec.Struct):
    """The few fields of a bucket value the watcher needs (the rest is skipped)."""

    event_seq: int = 0
    last_heartbeat_seq: int = 0
    last_heartbeat: datetime | None = None
    heartbeat_interval_s: float = 1.0
    offline_reason: str | None = None


_RECORD = msgspec.json.Decoder(_Record)


@dataclass
class Observed:
    since: float = float("inf")  # samples count from this wall time...
    until: float = float("inf")  # ...until this one (when the fleet starts leaving)
    bucket: list[float] = field(default_factory=list)
    bucket_stored: list[float] = field(default_factory=list)
    router: list[float] = field(default_factory=list)
    hop: list[float] = field(default_factory=list)
    last_beat: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (ts, interval)
    expired_seen: dict[str, float] = field(default_factory=dict)
    unavailable_seen: dict[str, float] = field(default_factory=dict)  # late or expired
    router_updates: int = 0

    def on_bucket(self, msg: Msg) -> None:
        now = time.time()
        try:
            rec = _RECORD.decode(msg.data)
        except msgspec.DecodeError:
            return  # a delete marker
        if rec.last_heartbeat is None:
            return
        beat = rec.last_heartbeat.timestamp()
        self.last_beat[msg.subject.rpartition(".")[2]] = (beat, rec.heartbeat_interval_s)
        if rec.event_seq == rec.last_heartbeat_seq and self.since <= now <= self.until:
            self.bucket.append(now - beat)
            self.bucket_stored.append(msg.metadata.timestamp.timestamp() - beat)

    def on_change(self, a: Availability, now: float) -> None:
        self.router_updates += 1
        if a.reason in ("late", "expired"):
            self.unavailable_seen.setdefault(a.worker_id, now)
        if a.reason == "expired":
            self.expired_seen.setdefault(a.worker_id, now)
        elif a.reason not in ("unregistered", "late") and self.since <= now <= self.until:
            self.router.append(now - a.changed_at.timestamp())


class TimedRouter(Router):
    """A Router that notes when each availability message reaches its index."""

    observed: Observed

    async def _on_msg(self, msg: Msg) -> None:
        await super()._on_msg(msg)
        now = time.time()
        with contextlib.suppress(Exception):
            if self.observed.since <= now <= self.observed.until:
                self.observed.hop.append(now - msg.metadata.timestamp.timestamp())
            self.observed.on_change(AVAILABILITY_DECODER.decode(msg.data), now)


def timeout_of(interval_s: float) -> float:
    return max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * interval_s)


async def measure(
    count: int, interval_s: float, duration_s: float, warmup_s: float,
    kill: int = 0, kill_after_s: float = 0.0, kill_within_s: float = 0.0, ramp_s: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    obs = Observed()
    async with nats_server(f"latency{count}") as server:
        nc = await provisioned(server.url)
        registry = RegistryProcess(server.url, every_s=0.5)
        await registry.start()
        await registry.wait_for(lambda s: s["caught_up"], 30.0)
        watch = await nc.jetstream().subscribe(
            "$KV.workers.>", cb=_sync(obs.on_bucket), ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.NEW, pending_msgs_limit=-1, pending_bytes_limit=-1,
        )  # fmt: skip
        rnc = await client(server.url, "bench-router")
        router = TimedRouter(rnc)
        router.observed = obs
        await router.ready()
        sim = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.simulate", "--nats", server.url, "--count", str(count),
            "--heartbeat-interval", str(interval_s), "--duration", str(duration_s), "--seed", "7",
            "--kill", str(kill), "--kill-after", str(kill_after_s),
            "--kill-within", str(kill_within_s), "--ramp", str(ramp_s),
            "--json", "--log-level", "warning", stdout=asyncio.subprocess.PIPE, cwd=str(ROOT),
        )  # fmt: skip
        t0 = time.monotonic()
        obs.until = time.time() + duration_s
        await _wait(lambda: len(router) >= count, duration_s)
        registered_s = time.monotonic() - t0
        await asyncio.sleep(warmup_s)
        obs.since = time.time()
        procs = [psutil.Process(p) for p in (registry.pid, server.process.pid, sim.pid)]  # type: ignore[union-attr]
        cpu0, w0, status0 = cpu_seconds(procs), time.monotonic(), dict(registry.latest)
        await asyncio.sleep(max(0.0, obs.until - time.time() - 0.2))
        cpu1, w1 = cpu_seconds(procs), time.monotonic()  # before the fleet leaves
        out, _ = await sim.communicate()
        status = dict(registry.latest)  # once the fleet has left (its unregister wave included)
        await asyncio.sleep(0.5)
        await watch.unsubscribe()
        await router.close()
        await rnc.close()
        await registry.stop()
        await nc.close()
    report = json.loads(out)
    names = ("registry", "nats-server", "simulator")
    cpu = {
        n: round(100 * (cpu1.get(p.pid, 0) - cpu0.get(p.pid, 0)) / (w1 - w0), 1)
        for n, p in zip(names, procs)
    }
    events = report["register"] + report["heartbeat"] + report["unregister"]
    return {
        "workers": count,
        "heartbeat_interval_s": interval_s,
        "events_per_s": round(count / interval_s),
        "sent_rate": round(events / report["duration_s"]),
        "registered_in_s": round(registered_s, 2),
        "window_s": round(w1 - w0, 1),
        "event_to_bucket_ms": percentiles(obs.bucket, 1000),
        "event_to_bucket_stored_ms": percentiles(obs.bucket_stored, 1000),
        "event_to_router_ms": percentiles(obs.router, 1000),
        "availability_to_router_ms": percentiles(obs.hop, 1000),
        "detection": _detection(obs, report["killed"]) if kill else None,
        "cpu_percent": cpu,
        "registry_gc_in_window": {
            "gen2_collections": status.get("gc_gen2", 0) - status0.get("gc_gen2", 0),
            "pause_total_ms": round(1000 * (status.get("gc_total_s", 0) - status0.get("gc_total_s", 0))),
            "max_pause_ms_since_start": status.get("gc_max_ms"),
        },
        "registry_status": {k: status.get(k) for k in (
            "events_applied", "bucket_writes", "availability_published", "expiries_published",
            "lates_published", "lag_s", "rss", "gc_pauses", "gc_gen2", "gc_max_ms", "gc_gen2_max_ms",
        )},
        "simulator": {k: report[k] for k in ("heartbeat", "errors", "timeouts", "max_lag_s", "kills")},
    }  # fmt: skip


def _detection(obs: Observed, killed: list[str]) -> dict[str, Any]:
    beyond, unavailable = [], []
    for wid in killed:
        last = obs.last_beat.get(wid)
        if last is None:
            continue
        if (seen := obs.expired_seen.get(wid)) is not None:
            beyond.append(seen - last[0] - timeout_of(last[1]))
        if (seen := obs.unavailable_seen.get(wid)) is not None:
            unavailable.append(seen - last[0])
    false_expiries = sorted(set(obs.expired_seen) - set(killed))
    return {
        "killed": len(killed),
        "detected": len(beyond),
        "false_expiries": len(false_expiries),
        "beyond_timeout_ms": percentiles(beyond, 1000),
        "unavailable_after_last_beat_ms": percentiles(unavailable, 1000),
    }


def _sync(fn: Any) -> Any:
    async def cb(msg: Msg) -> None:
        fn(msg)

    return cb


async def _wait(check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the fleet did not register in time")
        await asyncio.sleep(0.05)
