"""Active/standby takeover and the 3-node R3 cluster, measured on one machine in one run.

- takeover: one nats-server and two `registry up` processes. The active one (the
  lease's holder) is killed with kill -9, `kills` times; a new standby is started
  at once each time, as a supervisor would. Per kill: the seconds until another
  process holds the lease, and until an event published at the moment of the
  kill is folded into the bucket (the new active one has loaded the bucket,
  recreated the consumer at the checkpoint and folded the backlog). Then SIGTERM
  of the active one `terms` times: the lease is given up, no TTL to wait out.
- cluster: events folded per second by a projector from a preloaded stream, on
  the 3-node cluster of nats/cluster/ with R3 streams and bucket, and on a single
  node; the ratio cluster/single, from the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.aio.client import Client

from bench.common import client, fleet, nats_server, percentiles, preload
from registry import protocol
from registry.protocol import LEASE_BUCKET, LEASE_KEY
from registry.server.app import Registry
from registry.server.embedded import LocalCluster
from registry.server.provision import provision
from registry.server.settings import RegistrySettings


async def holder(nc: Client) -> str | None:
    """The lease holder's instance name, or None when free."""
    try:
        msg = await nc.jetstream().get_last_msg(f"KV_{LEASE_BUCKET}", f"$KV.{LEASE_BUCKET}.{LEASE_KEY}")
    except nats.js.errors.NotFoundError:
        return None
    if (msg.headers or {}).get("KV-Operation"):
        return None
    return str(json.loads(msg.data or b"{}").get("holder"))


class Procs:
    """`registry up --nats URL --instance reg-N` processes; logs in a temporary folder."""

    def __init__(self, url: str, logs: Path) -> None:
        self.url, self.logs = url, logs
        self.running: dict[str, asyncio.subprocess.Process] = {}
        self.n = 0

    async def start(self) -> None:
        name = f"reg-{self.n}"
        self.n += 1
        with open(self.logs / f"{name}.log", "ab") as log:  # noqa: ASYNC230 - opened once
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "registry.cli", "up", "--nats", self.url,
                "--instance", name, "--log-level", "warning",
                stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 60.0)  # the URL: provisioned
        self.running[name] = proc

    async def stop(self, name: str, sig: int) -> None:
        proc = self.running.pop(name)
        proc.send_signal(sig)
        await asyncio.wait_for(proc.wait(), 30.0)

    async def close(self) -> None:
        for proc in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _until(check: Any, timeout_s: float) -> float:
    """Seconds until the coroutine function `check` returns true (polled every 10 ms)."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"not within {timeout_s} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def takeover(kills: int, terms: int) -> dict[str, Any]:
    async with nats_server("ha") as server:
        nc = await client(server.url)
        logs = Path(tempfile.mkdtemp(prefix="bench-ha-"))
        procs = Procs(server.url, logs)
        js = nc.jetstream()
        lease_s: list[float] = []
        fold_s: list[float] = []
        handover_s: list[float] = []
        try:
            await procs.start()
            await procs.start()
            kv = await js.key_value(protocol.BUCKET)
            probes = fleet(nc, kills + terms, 3600.0, prefix="probe").workers
            rng = random.Random(11)

            async def held() -> bool:
                return await holder(nc) in procs.running

            for i in range(kills + terms):
                await _until(held, 30.0)
                # a term that has renewed its lease and folded; killed at any point of
                # the renewal period (a fixed pause would always hit the same one)
                await asyncio.sleep(rng.uniform(1.0, 2.0))
                active = await holder(nc)
                assert active is not None
                probe = probes[i]
                t0 = time.monotonic()
                await procs.stop(active, signal.SIGKILL if i < kills else signal.SIGTERM)
                await js.publish(protocol.event_subject("register", probe.worker_id),
                                 probe.register_body(3600.0))  # fmt: skip
                await procs.start()  # the next standby, at once

                async def other(active: str = active) -> bool:
                    h = await holder(nc)
                    return h is not None and h != active

                async def folded(wid: str = probe.worker_id) -> bool:
                    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                        return bool(await kv.get(wid))
                    return False

                await _until(other, 30.0)
                took = time.monotonic() - t0
                (lease_s if i < kills else handover_s).append(took)
                await _until(folded, 30.0)
                if i < kills:
                    fold_s.append(time.monotonic() - t0)
        finally:
            await procs.close()
            await nc.close()
            shutil.rmtree(logs, ignore_errors=True)
    return {
        "kill9_lease_s": percentiles(lease_s),
        "kill9_folding_s": percentiles(fold_s),
        "sigterm_lease_s": percentiles(handover_s),
        "lease_ttl_s": 3,
    }


async def _fold_rate(url: str, replicas: int, workers: int, rounds: int) -> dict[str, Any]:
    nc = await client(url)
    try:
        deadline = time.monotonic() + 60.0
        while True:  # R3 right after the servers start: the meta leader takes seconds
            try:
                await provision(nc, replicas=replicas)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        await preload(fleet(nc, workers, 5.0), rounds)
        last_seq = (await nc.jetstream().stream_info(protocol.EVENTS_STREAM)).state.last_seq
    finally:
        await nc.close()
    rc = await client(url, "bench-projector")
    registry = Registry(rc, RegistrySettings(nats_url=url, replicas=replicas))
    t0 = time.perf_counter()
    task = asyncio.create_task(registry.run())
    try:
        while registry.projector.counters.last_seq < last_seq:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - t0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await rc.close()
    return {"events": last_seq, "seconds": round(seconds, 3), "rate": round(last_seq / seconds)}


async def cluster(workers: int, rounds: int) -> dict[str, Any]:
    async with nats_server("single") as server:
        single = await _fold_rate(server.url, 1, workers, rounds)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    c = LocalCluster(tmp)
    await asyncio.to_thread(c.start)
    try:
        r3 = await _fold_rate(c.url, 3, workers, rounds)
    finally:
        await asyncio.to_thread(c.stop)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"workers": workers, "rounds": rounds, "single": single, "r3_cluster": r3,
            "ratio_r3_over_single": round(r3["rate"] / single["rate"], 2)}  # fmt: skip


async def measure(kills: int, terms: int, workers: int, rounds: int) -> dict[str, Any]:
    return {"takeover": await takeover(kills, terms), "cluster": await cluster(workers, rounds)}
