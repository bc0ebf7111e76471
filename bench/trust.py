"""The secured mode beside the open one, on one machine in one run.

Two nats-servers, started alike: one open (the packaged configuration), one
secured (`registry auth init`'s: operator, accounts, a scoped signing key per
role, a full resolver). On each, the same work:

- fold: a fleet's registrations and heartbeats preloaded into WORKER_EVENTS,
  then a projector connecting as the registry role; events folded per second
  (three times per mode, interleaved, the best kept);
- event->bucket: `agents` connections, each an agent speaking for its own
  worker (on the secured server with its own minted credentials, so every
  publish passes the per-worker permission check), beating at `rate_hz`; the
  latency from a heartbeat's publish to its record in the bucket, seen by a
  bucket watcher, while a registry process folds;
- connect: `connections` clients connecting one after another (each a JWT
  verified by the server on the secured one); the time per connection and the
  server's RSS with all of them connected.

Plus what a large fleet costs the operator: minting credentials (per second),
and the server's start time and RSS before any client (a secured server holds
no per-worker state: a worker is a credentials file, not a server entry).
Figures are ratios secured/open from the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
from nats.aio.client import Client

from agent.simulate.wire import sent_at_now
from bench.common import fleet, percentiles, preload, until
from registry import protocol
from registry.connect import Auth, NatsOptions, connect
from registry.server.app import Registry
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from registry.server.settings import RegistrySettings
from registry.trust.authdir import AuthDir


@contextlib.asynccontextmanager
async def server(secured: bool) -> AsyncIterator[tuple[NatsServer, AuthDir | None, float]]:
    """(server, its trust material or None, seconds it took to start)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-trust-"))
    auth = AuthDir.init(tmp / "auth") if secured else None
    s = NatsServer(tmp / "nats", config=auth.root / "server.conf" if auth else None)
    t0 = time.perf_counter()
    await asyncio.to_thread(s.start)
    started = time.perf_counter() - t0
    try:
        yield s, auth, started
    finally:
        await asyncio.to_thread(s.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def creds(auth: AuthDir | None, role: str, name: str) -> Auth:
    if auth is None:
        return Auth()
    path = auth.root / f"{role}-{name}.creds"
    if not path.exists():
        path.write_text(auth.mint(role, name))
    return Auth(creds=str(path))


async def client(url: str, auth: Auth, name: str = "bench") -> Client:
    async def quiet(e: Exception) -> None:
        pass

    options = NatsOptions.of(url, name, auth=auth)
    return await connect(options, error_cb=quiet, pending_size=64 * 1024 * 1024)


async def fold(url: str, auth: AuthDir | None, workers: int, rounds: int) -> dict[str, Any]:
    nc = await client(url, creds(auth, "admin", "admin"))  # speaks for the whole simulated fleet
    try:
        await provision(nc)
        await preload(fleet(nc, workers, 5.0), rounds)
        last_seq = (await nc.jetstream().stream_info(protocol.EVENTS_STREAM)).state.last_seq
    finally:
        await nc.close()
    rc = await client(url, creds(auth, "registry", "registry"), "bench-projector")
    registry = Registry(rc, RegistrySettings(nats_url=url))
    t0 = time.perf_counter()
    task = asyncio.create_task(registry.run())
    try:
        await until(lambda: registry.projector.counters.last_seq >= last_seq, 120.0, 0.005)
        seconds = time.perf_counter() - t0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rc.close()
    return {"events": last_seq, "seconds": round(seconds, 3), "rate": round(last_seq / seconds)}


async def event_to_bucket(
    url: str, auth: AuthDir | None, agents: int, rate_hz: float, duration_s: float
) -> dict[str, Any]:
    """Heartbeat publish -> bucket record, p50/p99 in ms, over a registry folding live."""
    rc = await client(url, creds(auth, "registry", "registry"), "bench-registry")
    # the brake off: the fleet stops beating at the end, and that is not the registry's fault
    registry = Registry(rc, RegistrySettings(nats_url=url, brake_fraction=1.0))
    running = asyncio.create_task(registry.run())
    watcher = await client(url, creds(auth, "admin", "admin"), "bench-watch")
    sim = fleet(watcher, agents, 1.0 / rate_hz, prefix="lat")
    conns = [await client(url, creds(auth, "agent", w.worker_id), w.worker_id) for w in sim.workers]
    sent: dict[int, float] = {}  # stream seq -> publish time
    seen: dict[int, float] = {}  # last_heartbeat_seq -> when the bucket said so
    try:
        await registry.link.wait_caught_up()
        kv = await watcher.jetstream().key_value(protocol.BUCKET)

        async def watch() -> None:
            w = await kv.watchall()
            async for entry in w:
                if entry is not None and entry.value:
                    rec = protocol.WORKER_INFO_DECODER.decode(entry.value)
                    seen.setdefault(rec.last_heartbeat_seq, time.perf_counter())

        watching = asyncio.create_task(watch())
        for w, nc in zip(sim.workers, conns, strict=True):
            await nc.jetstream().publish(protocol.event_subject("register", w.worker_id),
                                         w.register_body(1.0 / rate_hz))  # fmt: skip

        async def beat(w: Any, nc: Client) -> None:
            js = nc.jetstream()
            subject = protocol.event_subject("heartbeat", w.worker_id)
            end = time.monotonic() + duration_s
            while time.monotonic() < end:
                t = time.perf_counter()
                ack = await js.publish(subject, w.heartbeat_body(sent_at_now(), 0.0))
                sent[ack.seq] = t
                await asyncio.sleep(max(0.0, 1.0 / rate_hz - (time.perf_counter() - t)))

        await asyncio.gather(*(beat(w, nc) for w, nc in zip(sim.workers, conns, strict=True)))
        await asyncio.sleep(1.0)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        for nc in (*conns, watcher, rc):
            await nc.close()
    latencies = [seen[seq] - t for seq, t in sent.items() if seq in seen]
    return {"heartbeats": len(sent), "seen": len(latencies), **percentiles(latencies, 1000.0)}


async def connections(
    url: str, auth: AuthDir | None, count: int, server_pid: int
) -> dict[str, Any]:
    """`count` clients connecting one after another; ms per connection, server RSS."""
    ids = [f"conn-{i:05d}" for i in range(count)]
    auths = [creds(auth, "agent", i) for i in ids]
    clients = []
    before = psutil.Process(server_pid).memory_info().rss
    t0 = time.perf_counter()
    try:
        for a, i in zip(auths, ids, strict=True):
            clients.append(await client(url, a, i))
        seconds = time.perf_counter() - t0
        rss = psutil.Process(server_pid).memory_info().rss
    finally:
        for c in clients:
            await c.close()
    return {"count": count, "ms_per_connection": round(1000 * seconds / count, 3),
            "server_rss_mb": round(rss / 2**20, 1),
            "server_kb_per_connection": round((rss - before) / 1024 / count, 1)}  # fmt: skip


def mint_rate(count: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-mint-"))
    try:
        auth = AuthDir.init(tmp / "auth")
        t0 = time.perf_counter()
        for i in range(count):
            auth.mint("agent", f"w-{i:06d}")
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"count": count, "per_second": round(count / seconds)}


async def measure(
    workers: int = 1000, rounds: int = 10, agents: int = 20, rate_hz: float = 20.0,
    duration_s: float = 10.0, conns: int = 500, mints: int = 2000,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"mint": mint_rate(mints), "open": {}, "secured": {}}
    # the fold three times per mode, interleaved (open, secured, open, ...), the best
    # of each kept: a shared machine's noise is larger than the difference sought
    for _ in range(3):
        for mode in ("open", "secured"):
            async with server(mode == "secured") as (s, auth, started):
                assert s.process is not None
                idle_rss = psutil.Process(s.process.pid).memory_info().rss
                folded = await fold(s.url, auth, workers, rounds)
            m = out[mode]
            m["start_s"] = min(m.get("start_s", 1e9), round(started, 3))
            m["idle_rss_mb"] = round(idle_rss / 2**20, 1)
            m["fold_runs"] = [*m.get("fold_runs", []), folded["rate"]]
            if folded["rate"] >= m.get("fold", {}).get("rate", 0):
                m["fold"] = folded
    for mode in ("open", "secured"):
        async with server(mode == "secured") as (s, auth, _):
            out[mode]["event_to_bucket"] = await event_to_bucket(
                s.url, auth, agents, rate_hz, duration_s
            )
        async with server(mode == "secured") as (s, auth, _):
            assert s.process is not None
            out[mode]["connect"] = await connections(s.url, auth, conns, s.process.pid)
    o, sec = out["open"], out["secured"]
    out["ratios"] = {
        "fold_rate": round(sec["fold"]["rate"] / o["fold"]["rate"], 3),
        "event_to_bucket_p50": round(sec["event_to_bucket"]["p50"] / o["event_to_bucket"]["p50"], 3),
        "event_to_bucket_p99": round(sec["event_to_bucket"]["p99"] / o["event_to_bucket"]["p99"], 3),
        "connect": round(sec["connect"]["ms_per_connection"] / o["connect"]["ms_per_connection"], 3),
    }  # fmt: skip
    return out


if __name__ == "__main__":
    import json
    import sys

    sys.exit(print(json.dumps(asyncio.run(measure()), indent=1)) or 0)
