"""Shared pieces of the benchmarks: servers, the registry in a child process, figures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.aio.client import Client

from agent.simulate import AckedPublisher, Fleet, SimSettings
from registry.connect import split_servers
from registry.server.embedded import NatsServer, find_binary
from registry.server.provision import provision

ROOT = Path(__file__).resolve().parent.parent
REGISTRY_PROC = Path(__file__).resolve().parent / "registry_proc.py"


# ---------------------------------------------------------------- figures


def percentiles(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> dict[str, Any]:
    """p50 / p99 / max (nearest rank), times `scale`; n is the sample count."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    s = sorted(values)

    def rank(q: float) -> float:
        return s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))]

    return {
        "n": len(s),
        "p50": round(rank(0.50) * scale, digits),
        "p99": round(rank(0.99) * scale, digits),
        "max": round(s[-1] * scale, digits),
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    version = subprocess.run(
        [find_binary(), "--version"], capture_output=True, text=True, check=False
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "nats_server": version.stdout.strip() or version.stderr.strip(),
        "nats_py": metadata.version("nats-py"),
        "msgspec": metadata.version("msgspec"),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------- servers and clients


@contextlib.asynccontextmanager
async def nats_server(label: str) -> AsyncIterator[NatsServer]:
    """A fresh nats-server with JetStream and a temporary store, removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{label}-"))
    server = NatsServer(tmp / "nats")
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(tmp, ignore_errors=True)


async def _quiet(e: Exception) -> None:
    pass


async def client(url: str, name: str = "bench") -> Client:
    return await nats.connect(
        split_servers(url), name=name, max_reconnect_attempts=-1, pending_size=64 * 1024 * 1024, error_cb=_quiet
    )


async def provisioned(url: str) -> Client:
    nc = await client(url)
    await provision(nc)
    return nc


def fleet(nc: Client, count: int, interval_s: float, seed: int = 1, prefix: str = "sim") -> Fleet:
    """The simulator's fleet, to publish realistic events from the bench itself."""
    settings = SimSettings(
        count=count, heartbeat_interval_s=interval_s, seed=seed, id_prefix=prefix
    )
    return Fleet(settings, AckedPublisher(nc, window=8192))


async def preload(f: Fleet, rounds: int, register: bool = True) -> int:
    """Publish (registers and) `rounds` heartbeats per worker, in schedule order."""
    publisher = f.pub
    assert isinstance(publisher, AckedPublisher)
    await publisher.start()
    if register:
        for w in f.workers:
            await f.register(w)
    for _ in range(rounds):
        for i in f.schedule.order:
            await f.heartbeat(f.workers[i])
    await publisher.settle(60.0)
    if publisher.errors or publisher.timeouts:
        raise RuntimeError(f"preload lost events: {publisher.errors} errors, "
                           f"{publisher.timeouts} timeouts ({publisher.last_error})")  # fmt: skip
    return f.report.events


async def stream_state(nc: Client, stream: str) -> Any:
    return (await nc.jetstream().stream_info(stream)).state


async def until(check: Callable[[], Any], timeout_s: float, every_s: float = 0.01) -> float:
    """Poll until `check()` is truthy; the monotonic time it became so."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout_s} s")
        await asyncio.sleep(every_s)


def cpu_seconds(procs: Iterable[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


# ---------------------------------------------------------------- the registry in a child process


class RegistryProcess:
    """The registry (projector + sweeper) in its own process, reporting its state.

    The child prints one JSON line per `every_s`: counters, caught_up,
    sweeping, records and its resident memory. Memory per worker and cold
    start are measured on this process, so the benchmark's own objects are
    not counted.
    """

    def __init__(
        self, url: str, every_s: float = 0.05, settings: dict[str, Any] | None = None,
        script: Path = REGISTRY_PROC,
    ) -> None:  # fmt: skip
        """`settings`: RegistrySettings fields besides the URL; `script`: another child
        that speaks the same way (bench/router_proc.py)."""
        self.url = url
        self.every_s = every_s
        self.settings = settings or {}
        self.script = script
        self.proc: asyncio.subprocess.Process | None = None
        self.latest: dict[str, Any] = {}
        self.started_at = 0.0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(self.script), self.url, str(self.every_s),
            json.dumps(self.settings), stdout=asyncio.subprocess.PIPE, cwd=str(ROOT),
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                self.latest = json.loads(line)

    async def wait_for(self, check: Callable[[dict[str, Any]], bool], timeout_s: float) -> float:
        """Monotonic time (here) at which a status line first satisfied `check`."""

        def ok() -> bool:
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"registry process exited with {self.proc.returncode}")
            return bool(self.latest) and check(self.latest)

        return await until(ok, timeout_s, every_s=0.005)

    async def measure(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """A status line taken after a full collection in the child (SIGUSR1), with the
        sizes of what it holds."""
        assert self.proc is not None
        asked = int(self.latest.get("measured", 0)) + 1
        self.proc.send_signal(signal.SIGUSR1)
        await self.wait_for(lambda s: int(s.get("measured", 0)) >= asked, timeout_s)
        return dict(self.latest)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 15.0)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader
