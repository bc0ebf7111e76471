"""HTTP heartbeats: our gateway beside the original plan's design, in one run.

Two services on 127.0.0.1, driven one after the other by the same load generator:

- baseline: the original plan's Steps 1-3 rebuilt as written (`seed_reference`
  in ../shared/baselines, see its README: FastAPI, a dict, synchronous Redis
  SETEX), served by uvicorn (one process, no access log) from a venv outside the
  repository (made on first use), with a redis-server of its own;
- gateway: `registry http` (one uvicorn process) over a nats-server of its own
  and a `registry up --nats` process folding what the gateway publishes.

The load generator (aiohttp, in this process): `workers` workers registered
with `POST /api/v1/workers/register`, then `senders` concurrent senders, each
on one keep-alive connection, posting heartbeats back to back (sender k beats
workers k, k + senders, ... in turn) for `warmup_s` (not counted) and then
`duration_s`. Per request, the time from sending to the answer read; a non-2xx
answer or a failed request is an error, counted by status or exception. CPU of
each process over the measured window, in % of one core, and heartbeats per
CPU-second of all the service's processes (a figure that moves less than the
rate when other work shares the machine). Rounds alternate
baseline and gateway; the best throughput of each side is compared (a shared
machine's noise is larger than a round's), every round is kept.

A side that cannot run here is skipped with the reason (no redis-server, no
`registry http` on this checkout); the other is still measured.

    .venv/bin/python -m bench.http --duration 10     # this part alone, JSON on stdout

Environment: SEED_BASELINES (the folder holding seed_reference/, default
../shared/baselines from the repository root), SEED_VENV (the baseline's venv,
default /tmp/seed-venv).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.common import ROOT, client, percentiles
from registry import protocol
from registry.server.embedded import NatsServer, free_port

BASELINES = Path(os.environ.get("SEED_BASELINES", ROOT.parent / "shared" / "baselines"))
SEED_VENV = Path(os.environ.get("SEED_VENV", "/tmp/seed-venv"))
SEED_PACKAGES = ("fastapi", "uvicorn[standard]", "redis", "structlog", "pydantic")
STACK = ("fastapi", "uvicorn", "uvloop", "httptools", "h11", "pydantic")  # versions recorded
READY_S = 60.0  # a service answers within this, or the part fails
STOP_S = 10.0  # SIGTERM, then SIGKILL after this
REQUEST_S = 30.0  # one request's limit (a failed request is counted, not waited on)
REGISTER_S = 120.0  # the whole fleet registered within this, or the part fails
JSON = {"Content-Type": "application/json"}
CAPABILITIES = ("gpu", "cpu", "hybrid")


class Skip(Exception):
    """This side cannot run on this machine or checkout; the message says why."""


@dataclass(frozen=True)
class Load:
    workers: int = 1000
    senders: int = 32
    warmup_s: float = 2.0
    duration_s: float = 10.0

    def ids(self) -> list[str]:
        return [f"http-bench-{i:06d}" for i in range(self.workers)]


# ---------------------------------------------------------------- the bodies (the plan's models)


def registration(i: int, worker_id: str) -> bytes:
    """`{"registration": WorkerRegistration}`, valid for both services."""
    cap = CAPABILITIES[i % 3]
    gpus = 0 if cap == "cpu" else 1 + i % 4
    reg = {
        "worker_id": worker_id, "name": f"bench-{cap}-{i}", "capability": cap,
        "hardware": {"cpu_cores": 8 + 8 * (i % 4), "memory_gb": 64.0, "gpu_count": gpus,
                     "gpu_memory_gb": 24.0 * gpus, "gpu_models": ["NVIDIA L4"] * gpus,
                     "disk_space_gb": 500.0},
        "location": {"hostname": f"node-{i}", "ip_address": f"10.0.{i // 250}.{i % 250 + 1}",
                     "port": 8000, "is_remote": True},
        "max_concurrent_tasks": 4,
        "supported_content_types": list(protocol.DEFAULT_CONTENT_TYPES[protocol.WorkerCapability(cap)]),
        "tags": {"pool": "bench"},
    }  # fmt: skip
    return json.dumps({"registration": reg}).encode()


def heartbeat(worker_id: str, rng: random.Random) -> bytes:
    """The plan's WorkerHeartbeat; the timestamp naive UTC, as its client sends it
    (an aware one makes the baseline's `is_healthy` raise)."""
    body = {
        "worker_id": worker_id, "status": "online",
        "metrics": {"cpu_usage_percent": round(rng.uniform(5, 95), 1),
                    "memory_usage_percent": round(rng.uniform(10, 80), 1),
                    "gpu_usage_percent": round(rng.uniform(0, 100), 1),
                    "active_tasks": rng.randrange(4), "completed_tasks": rng.randrange(1000),
                    "failed_tasks": rng.randrange(10),
                    "avg_task_duration_seconds": round(rng.uniform(1, 60), 2)},
        "timestamp": datetime.now(UTC).replace(tzinfo=None).isoformat(),
    }  # fmt: skip
    return json.dumps(body).encode()


# ---------------------------------------------------------------- processes


@contextlib.asynccontextmanager
async def process(
    args: Sequence[str], log: Path, cwd: Path, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process logging to `log`, stopped (TERM, then KILL) on the way out."""
    with open(log, "ab") as out:  # noqa: ASYNC230 - opened once, before the child starts
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=str(cwd), env=env,
        )  # fmt: skip
    try:
        yield proc
    finally:
        await stop(proc)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), STOP_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def tail(log: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    return ""


async def ready(url: str, procs: dict[Path, asyncio.subprocess.Process]) -> float:
    """Poll `url` until it answers 200; seconds it took. A child that exits fails it."""
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as s:
        while time.perf_counter() - t0 < READY_S:
            for log, p in procs.items():
                if p.returncode is not None:
                    raise RuntimeError(f"{log.stem} exited with {p.returncode}: {tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.get(url) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {READY_S} s")


def tree(pid: int) -> list[psutil.Process]:
    """The process and its children (uvicorn's one worker, a nats-server's nothing)."""
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def cpu_s(procs: Sequence[psutil.Process]) -> float | None:
    """CPU seconds of these processes; None when one is gone (its time is lost with it)."""
    try:
        return float(sum(t.user + t.system for t in (p.cpu_times() for p in procs)))
    except psutil.Error:
        return None


# ---------------------------------------------------------------- the load generator


@dataclass
class Tally:
    latencies: list[float]
    errors: Counter[str]
    answered_ok: int = 0  # every 2xx heartbeat, warm-up included


async def register_all(base: str, load: Load, sessions: list[aiohttp.ClientSession]) -> float:
    """Every worker registered (a failure stops the part); seconds it took."""
    ids = load.ids()
    todo = iter(enumerate(ids))
    t0 = time.perf_counter()

    async def sender(s: aiohttp.ClientSession) -> None:
        for i, wid in todo:
            async with s.post(f"{base}/api/v1/workers/register", data=registration(i, wid),
                              headers=JSON) as r:  # fmt: skip
                text = await r.text()
                if r.status // 100 != 2:
                    raise RuntimeError(f"registering {wid}: {r.status} {text[:200]}")

    await asyncio.gather(*(sender(s) for s in sessions))
    return time.perf_counter() - t0


async def beat(
    base: str, s: aiohttp.ClientSession, wids: list[str], seed: int,
    window: tuple[float, float], tally: Tally,
) -> None:  # fmt: skip
    """One sender: heartbeats back to back over its workers until the window closes."""
    rng, t0, t1, i = random.Random(seed), window[0], window[1], 0
    while (start := time.perf_counter()) < t1:
        wid = wids[i % len(wids)]
        i += 1
        try:
            async with s.post(f"{base}/api/v1/workers/{wid}/heartbeat",
                              data=heartbeat(wid, rng), headers=JSON) as r:  # fmt: skip
                await r.read()
                outcome = "ok" if r.status // 100 == 2 else str(r.status)
        except (aiohttp.ClientError, TimeoutError) as e:
            outcome = type(e).__name__
        end = time.perf_counter()
        tally.answered_ok += outcome == "ok"
        if start < t0:
            continue
        if outcome == "ok":
            tally.latencies.append(end - start)
        else:
            tally.errors[outcome] += 1


async def window_cpu(
    roles: dict[str, list[psutil.Process]], window: tuple[float, float]
) -> dict[str, float | None]:
    """% of one core per role over the window (snapshots at its edges); None for a role
    whose process was gone at either edge."""
    await asyncio.sleep(max(0.0, window[0] - time.perf_counter()))
    t0, before = time.perf_counter(), {k: cpu_s(v) for k, v in roles.items()}
    await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
    t1, after = time.perf_counter(), {k: cpu_s(v) for k, v in roles.items()}
    out: dict[str, float | None] = {}
    for k in roles:
        b, a = before[k], after[k]
        out[k] = None if a is None or b is None else round(100 * (a - b) / (t1 - t0), 1)
    return out


async def drive(base: str, load: Load, roles: dict[str, list[psutil.Process]]) -> dict[str, Any]:
    """Register the fleet, then heartbeats for warm-up + duration; the figures."""
    roles = {**roles, "load_generator": [psutil.Process()]}
    timeout = aiohttp.ClientTimeout(total=REQUEST_S)
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1), timeout=timeout))
            for _ in range(load.senders)
        ]  # fmt: skip
        register_s = await asyncio.wait_for(register_all(base, load, sessions), REGISTER_S)
        ids, tally = load.ids(), Tally([], Counter())
        t0 = time.perf_counter() + load.warmup_s
        window = (t0, t0 + load.duration_s)
        cpu = asyncio.create_task(window_cpu(roles, window))
        await asyncio.gather(*(beat(base, s, ids[k :: load.senders], k, window, tally)
                               for k, s in enumerate(sessions)))  # fmt: skip
        cpu_percent = await cpu
    rate = len(tally.latencies) / load.duration_s
    parts = [v for k, v in cpu_percent.items() if k != "load_generator"]
    service = None if None in parts else sum(v for v in parts if v is not None)
    return {
        "registered": load.workers, "register_s": round(register_s, 2),
        "heartbeats_per_s": round(rate),
        # all of the service's processes, less sensitive to others' work than the rate
        "heartbeats_per_cpu_s": round(100 * rate / service) if service else None,
        "ok": len(tally.latencies), "errors": dict(tally.errors),
        "latency_ms": percentiles(tally.latencies, 1000.0),
        "cpu_percent": cpu_percent, "answered_ok_total": tally.answered_ok,
        "load_avg_1m": round(os.getloadavg()[0], 2),  # the machine, others' work included
    }  # fmt: skip


# ---------------------------------------------------------------- the baseline


def seed_uvicorn() -> tuple[Path, dict[str, str]]:
    """The baseline's uvicorn (its venv made on first use) and its packages' versions."""
    if not (BASELINES / "seed_reference" / "server.py").is_file():
        raise Skip(f"no baseline at {BASELINES}/seed_reference (set SEED_BASELINES)")
    python, uvicorn = SEED_VENV / "bin" / "python", SEED_VENV / "bin" / "uvicorn"
    if not uvicorn.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(SEED_VENV)], check=True,
                           capture_output=True, timeout=120)  # fmt: skip
            subprocess.run([str(python), "-m", "pip", "install", "-q", *SEED_PACKAGES],
                           check=True, capture_output=True, timeout=600)  # fmt: skip
        except (subprocess.SubprocessError, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            raise Skip(f"could not make the baseline's venv {SEED_VENV}: {e} "
                       f"{detail.decode(errors='replace')[-300:]}") from None  # fmt: skip
    code = (
        "import importlib.metadata as m, json, fastapi, uvicorn, redis, structlog, pydantic\n"
        f"found = [p for p in {(*STACK, 'redis')!r} if p in {{d.name for d in m.distributions()}}]\n"
        "print(json.dumps({p: m.version(p) for p in found}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise Skip(f"the baseline's venv {SEED_VENV} is broken: {out.stderr.strip()[-300:]}")
    return uvicorn, json.loads(out.stdout)


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise Skip("redis-server is not installed (apt-get install -y redis-server)")
    return found


async def redis_ready(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {tail(log)}")
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            answer = await reader.readline()
            writer.close()
            if answer.startswith(b"+PONG"):
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not answer within {READY_S} s")


async def baseline(load: Load, uvicorn: Path, tmp: Path) -> dict[str, Any]:
    """redis-server + uvicorn serving seed_reference.server:app, driven."""
    rport, hport = free_port(), free_port()
    redis_args = [redis_binary(), "--bind", "127.0.0.1", "--port", str(rport),
                  "--daemonize", "no", "--dir", str(tmp)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
    app_args = [str(uvicorn), "seed_reference.server:app", "--host", "127.0.0.1",
                "--port", str(hport), "--workers", "1", "--no-access-log"]  # fmt: skip
    rlog, ulog = tmp / "redis-server.log", tmp / "seed-uvicorn.log"
    async with process(redis_args, rlog, tmp) as redis:
        await redis_ready(rport, redis, rlog)
        async with process(app_args, ulog, BASELINES, env) as app:
            base = f"http://127.0.0.1:{hport}"
            start_s = await ready(f"{base}/api/v1/workers/stats", {ulog: app, rlog: redis})
            roles = {"server": tree(app.pid), "redis": tree(redis.pid)}
            out = await drive(base, load, roles)
    return {"ready_s": round(start_s, 2), **out}


# ---------------------------------------------------------------- ours


def gateway_available() -> dict[str, str]:
    """`registry http` exists on this checkout (else Skip); its packages' versions."""
    out = subprocess.run([sys.executable, "-m", "registry.cli", "http", "--help"],
                         capture_output=True, text=True, check=False, cwd=ROOT)  # fmt: skip
    if out.returncode != 0:
        raise Skip("`registry http` is not on this checkout yet (registry/http/ not merged): "
                   "the gateway was not measured")  # fmt: skip
    names = {d.name for d in metadata.distributions()}
    return {p: metadata.version(p) for p in (*STACK, "nats-py", "msgspec") if p in names}


async def stream_last_seq(url: str) -> int:
    nc = await client(url, "bench-http-check")
    try:
        return int((await nc.jetstream().stream_info(protocol.EVENTS_STREAM)).state.last_seq)
    finally:
        await nc.close()


async def gateway(load: Load, tmp: Path) -> dict[str, Any]:
    """nats-server + `registry up --nats` + `registry http --nats --port`, driven."""
    nats = NatsServer(tmp / "nats")
    await asyncio.to_thread(nats.start)
    try:
        assert nats.process is not None
        hport, cli = free_port(), [sys.executable, "-m", "registry.cli"]
        quiet = ["--nats", nats.url, "--log-level", "warning"]
        reg_args, http_args = [*cli, "up", *quiet], [*cli, "http", *quiet, "--port", str(hport)]
        rlog, glog = tmp / "registry-up.log", tmp / "registry-http.log"
        async with process(reg_args, rlog, tmp) as reg, process(http_args, glog, tmp) as gw:
            base = f"http://127.0.0.1:{hport}"
            start_s = await ready(f"{base}/api/v1/health", {rlog: reg, glog: gw})
            roles = {"server": tree(gw.pid), "registry": tree(reg.pid),
                     "nats_server": tree(nats.process.pid)}  # fmt: skip
            out = await drive(base, load, roles)
        stored = await stream_last_seq(nats.url)
    finally:
        await asyncio.to_thread(nats.stop)
    accepted = load.workers + out["answered_ok_total"]
    return {"ready_s": round(start_s, 2), **out,
            "events_stored": stored, "accepted_not_stored": max(0, accepted - stored)}  # fmt: skip


# ---------------------------------------------------------------- the part


async def side(name: str, load: Load, uvicorn: Path | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-http-{name}-"))
    try:
        if name == "baseline":
            assert uvicorn is not None
            return await baseline(load, uvicorn, tmp)
        return await gateway(load, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(out: dict[str, Any]) -> None:
    """The best round of each side (by throughput) and the ratios, when both ran."""
    for name in ("baseline", "gateway"):
        runs = out[name].get("runs")
        if runs:
            out[name]["best"] = max(runs, key=lambda r: r["heartbeats_per_s"])
    b, g = out["baseline"].get("best"), out["gateway"].get("best")
    if b and g and b["heartbeats_per_s"] and b["latency_ms"]["p99"]:
        out["ratios"] = {
            "heartbeats_per_s": round(g["heartbeats_per_s"] / b["heartbeats_per_s"], 2),
            "p99": round(g["latency_ms"]["p99"] / b["latency_ms"]["p99"], 3),
        }
        if g.get("heartbeats_per_cpu_s") and b.get("heartbeats_per_cpu_s"):
            ratio = g["heartbeats_per_cpu_s"] / b["heartbeats_per_cpu_s"]
            out["ratios"]["heartbeats_per_cpu_s"] = round(ratio, 2)


async def measure(
    workers: int = 1000, senders: int = 32, warmup_s: float = 2.0, duration_s: float = 10.0,
    rounds: int = 1,
) -> dict[str, Any]:  # fmt: skip
    load = Load(workers, senders, warmup_s, duration_s)
    if load.workers < load.senders:
        raise ValueError("workers must be at least senders")
    out: dict[str, Any] = {**asdict(load), "rounds": rounds, "baseline": {}, "gateway": {}}
    uvicorn: Path | None = None
    try:
        redis_binary()
        uvicorn, out["baseline"]["stack"] = await asyncio.to_thread(seed_uvicorn)
    except Skip as e:
        out["baseline"]["skipped"] = str(e)
    try:
        out["gateway"]["stack"] = await asyncio.to_thread(gateway_available)
    except Skip as e:
        out["gateway"]["skipped"] = str(e)
    for _ in range(rounds):
        for name in ("baseline", "gateway"):
            if "skipped" not in out[name]:
                run = await side(name, load, uvicorn)
                out[name]["runs"] = [*out[name].get("runs", []), run]
    compare(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--senders", type=int, default=32)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds not counted (default 2)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured (default 10)")
    p.add_argument("--rounds", type=int, default=1, help="baseline, gateway, baseline, ...")
    a = p.parse_args(argv)
    result = asyncio.run(measure(a.workers, a.senders, a.warmup, a.duration, a.rounds))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
