"""`registry workers --at`: the fleet at a moment, folded from WORKER_EVENTS.

One server, one stream: `workers` registrations and `rounds` heartbeats each (the
simulator's fleet, published as fast as JetStream takes them, as bench/scale.py
does); a moment is taken after the first round (`half`) and after the last (`end`).
Then, in this order, on the same stream:

- cold replay (the baseline): a registry process starts on the empty bucket and
  folds the whole stream into it; timed from launch to its counters showing the
  last event folded (interpreter start included);
- bucket read: what `registry workers` does, the bucket read into records
  (`load_records`), in this process;
- at: `registry.timetravel.fleet_at` in this process, at `end` (every event) and
  at `half`, best of `repeats`; and how long the event loop made a 1 ms ticker
  beside it wait (what the registry's projector would wait for when its service
  folds), against the same ticker with nothing running (the machine's noise);
- the CLI: `registry workers --json` and `registry workers --at END --json` in
  child processes, launch to exit;
- the service: `registry.at` answered by the running registry, the first page
  (a fold) and the next (the same fold, kept).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import (
    ROOT,
    RegistryProcess,
    fleet,
    nats_server,
    percentiles,
    provisioned,
    stream_state,
)
from registry.ops.commands import load_records
from registry.timeparse import format_instant
from registry.timetravel import fleet_at

RETENTION_S = 86400.0


async def _publish(workers: int, rounds: int, nc: Any) -> tuple[datetime, datetime]:
    f = fleet(nc, workers, 600.0, seed=13)  # a long interval: nobody is late meanwhile
    await f.pub.start()  # type: ignore[attr-defined]
    for w in f.workers:
        await f.register(w)
    moments = []
    for _ in range(rounds):
        for i in f.schedule.order:
            await f.heartbeat(f.workers[i])
        await f.pub.settle(120.0)  # type: ignore[attr-defined]
        moments.append(datetime.now(UTC))
        await asyncio.sleep(0.01)  # the next round is stored after the moment
    return moments[0], moments[-1]


async def _ticker(gaps: list[float]) -> None:
    """Wake every millisecond; record how long each wait for the loop really took."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(0.001)
        now = time.monotonic()
        gaps.append(now - last)
        last = now


async def _timed_fold(nc: Any, at: datetime, gaps: list[float]) -> tuple[float, int]:
    """Seconds to fold and the records, the ticker's waits meanwhile added to `gaps`."""
    tick = asyncio.create_task(_ticker(gaps))
    try:
        t0 = time.monotonic()
        result = await fleet_at(nc, at, RETENTION_S)
        seconds = time.monotonic() - t0
    finally:
        tick.cancel()
    return seconds, len(result.records)


async def _idle_gaps(seconds: float) -> list[float]:
    """The ticker's waits with nothing else running here: the machine's own noise."""
    gaps: list[float] = []
    tick = asyncio.create_task(_ticker(gaps))
    await asyncio.sleep(seconds)
    tick.cancel()
    return gaps


async def _cli(*argv: str) -> tuple[float, int]:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "registry.cli", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, cwd=str(ROOT),
    )  # fmt: skip
    out, _ = await proc.communicate()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"registry {' '.join(argv[:3])} exited {proc.returncode}")
    answer = json.loads(out)
    return seconds, len(answer["workers"] if isinstance(answer, dict) else answer)


async def _service(nc: Any, at: datetime) -> tuple[float, float]:
    body = json.dumps({"at": format_instant(at), "limit": 500}).encode()
    times = []
    for _ in range(2):
        t0 = time.monotonic()
        msg = await nc.request("registry.at", body, timeout=60.0)
        times.append(time.monotonic() - t0)
        if (msg.headers or {}).get("Nats-Service-Error"):
            raise RuntimeError(f"registry.at: {msg.headers}")
    return times[0], times[1]


async def measure(workers: int = 10_000, rounds: int = 3, repeats: int = 3) -> dict[str, Any]:
    async with nats_server("at") as server:
        nc = await provisioned(server.url)
        half, end = await _publish(workers, rounds, nc)
        events = (await stream_state(nc, "WORKER_EVENTS")).last_seq
        registry = RegistryProcess(server.url, every_s=0.01)
        await registry.start()
        try:
            done = await registry.wait_for(
                lambda s: s["caught_up"] and s["last_seq"] >= events and s["records"] >= workers,
                300.0,
            )
            cold = done - registry.started_at
            t0 = time.monotonic()
            in_bucket = len(await load_records(nc))
            bucket_s = time.monotonic() - t0
            gaps: list[float] = []
            folds = {"end": [await _timed_fold(nc, end, gaps) for _ in range(repeats)],
                     "half": [await _timed_fold(nc, half, gaps) for _ in range(repeats)]}  # fmt: skip
            idle = await _idle_gaps(2.0)
            cli_workers, _ = await _cli("workers", "--json", "--nats", server.url)
            cli_at, cli_n = await _cli("workers", "--at", format_instant(end), "--json",
                                       "--nats", server.url)  # fmt: skip
            first_page, next_page = await _service(nc, end)
        finally:
            await registry.stop()
        await nc.close()
    at_end = min(f[0] for f in folds["end"])
    return {
        "workers": workers,
        "events": events,
        "events_at_half": workers * 2,  # the registrations and the first round
        "records": {"bucket": in_bucket, "at_end": folds["end"][0][1], "cli_at": cli_n},
        "cold_replay_s": round(cold, 2),
        "bucket_read_s": round(bucket_s, 3),
        "at_end_s": round(at_end, 3),
        "at_half_s": round(min(f[0] for f in folds["half"]), 3),
        "loop_wait_ms": {"folding": percentiles(gaps, 1000, 1), "idle": percentiles(idle, 1000, 1)},
        "at_events_per_s": round(events / at_end),
        "cli_workers_s": round(cli_workers, 2),
        "cli_at_s": round(cli_at, 2),
        "service_first_page_s": round(first_page, 3),
        "service_next_page_s": round(next_page, 4),
        "ratios": {
            "at / cold replay": round(at_end / cold, 2),
            "cli --at / cold replay": round(cli_at / cold, 2),
            "at / bucket read": round(at_end / bucket_s, 1),
            "cli --at / cli workers": round(cli_at / cli_workers, 2),
        },
    }


if __name__ == "__main__":
    import argparse

    from registry import logs

    p = argparse.ArgumentParser(prog="bench/at.py", description="the part 'at' alone")
    p.add_argument("--workers", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3, help="heartbeats per worker")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logs.configure("warning", json=True)
    print(json.dumps(asyncio.run(measure(args.workers, args.rounds, args.repeats)), indent=2))
