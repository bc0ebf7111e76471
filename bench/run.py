"""Benchmarks of the worker registry, measured on one machine in one run.

    .venv/bin/python bench/run.py            # full run (about 8 minutes on 2 cores; http adds 2.5)
    .venv/bin/python bench/run.py --quick    # small sizes (under 2 minutes)
    .venv/bin/python bench/run.py --only throughput,routing --profile
    .venv/bin/python bench/run.py --only churn   # 20,000 ids come and go (about 3 minutes)

Each part starts its own nats-server(s) on 127.0.0.1 with a temporary store;
"http" also the original plan's service beside our gateway, with a
redis-server (bench/http.py: `--only http`).
Results: bench/results/latest.json and latest.md (quick.json / quick.md with
--quick). With --profile the projector is sampled with py-spy during the
throughput run (bench/results/projector-profile.txt). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# run by path, Python puts bench/ first on sys.path, where bench/http.py would stand for
# the standard library's http: the repository root takes its place
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p).resolve() != _HERE)]

from bench import at, churn, ha, http, latency, report, routing, scale, service, throughput, trust
from bench.common import machine
from bench.profile import PySpy, summary
from registry import logs

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("throughput", "latency", "routing", "scale", "service", "trust", "ha", "http", "at",
         "churn")

SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "throughput": [(1000, 10)],
        "straight_max": 5000,
        "latency": [
            {"count": 1000, "interval_s": 0.5, "duration_s": 14.0, "warmup_s": 1.0,
                 "kill": 20, "kill_after_s": 2.0, "kill_within_s": 3.0},
        ],
        "routing": [1000, 10000],
        "service": [10000],
        "memory": [1000, 5000],
        "bytes_sample": (50, 5),
        "trust": {"workers": 1000, "rounds": 5, "agents": 20, "rate_hz": 20.0,
                  "duration_s": 6.0, "conns": 200, "mints": 1000},
        "ha": {"kills": 20, "terms": 3, "workers": 1000, "rounds": 10},
        "http": {"workers": 1000, "senders": 32, "warmup_s": 2.0, "duration_s": 10.0, "rounds": 1},
        "at": {"workers": 2000, "rounds": 3, "repeats": 2},
        "churn": {"live": 500, "churn": 3000, "churn_s": 15.0, "life_s": (2.0, 8.0),
                  "retention_s": 3.0, "marker_ttl_s": 2},
    },
    "full": {
        "throughput": [(1000, 50), (10000, 5), (100000, 1)],
        "straight_max": 10000,
        "latency": [
            {"count": 1000, "interval_s": 0.5, "duration_s": 20.0, "warmup_s": 2.0,
                 "kill": 100, "kill_after_s": 3.0, "kill_within_s": 5.0},
            {"count": 10000, "interval_s": 5.0, "duration_s": 45.0, "warmup_s": 5.0,
                 "kill": 100, "kill_after_s": 5.0, "kill_within_s": 10.0},
            {"count": 100000, "interval_s": 50.0, "duration_s": 110.0, "warmup_s": 10.0, "ramp_s": 60.0},
        ],
        "routing": [1000, 10000, 100000],
        "service": [10000, 100000],
        "memory": [1000, 10000, 100000],
        "bytes_sample": (200, 20),
        "trust": {"workers": 10000, "rounds": 5, "agents": 50, "rate_hz": 20.0,
                  "duration_s": 20.0, "conns": 1000, "mints": 5000},
        "ha": {"kills": 30, "terms": 5, "workers": 10000, "rounds": 5},
        "http": {"workers": 1000, "senders": 32, "warmup_s": 5.0, "duration_s": 30.0, "rounds": 2},
        "at": {"workers": 10000, "rounds": 3, "repeats": 3},
        "churn": {"live": 2000, "churn": 20000, "churn_s": 60.0, "life_s": (5.0, 20.0),
                  "retention_s": 10.0, "marker_ttl_s": 5},
    },
}  # fmt: skip


async def run_parts(mode: str, parts: list[str], profile: bool) -> dict[str, Any]:
    sizes = SIZES[mode]
    results: dict[str, Any] = {}

    async def part(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        if name not in parts:
            return
        t0 = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = await fn()
        except Exception as e:  # noqa: BLE001 - recorded; the other parts still run
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"bench: {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)

    async def tp() -> list[dict[str, Any]]:
        out = []
        middle = len(sizes["throughput"]) // 2  # profiled: 10,000 workers in the full run
        for i, (workers, rounds) in enumerate(sizes["throughput"]):
            spy = PySpy(RESULTS / "projector-profile.raw") if profile and i == middle else None
            out.append(await throughput.measure(workers, rounds, sizes["straight_max"], spy))
            if spy is not None:
                (RESULTS / "projector-profile.txt").write_text(summary(spy.path))
        return out

    async def lat() -> list[dict[str, Any]]:
        return [await latency.measure(**kw) for kw in sizes["latency"]]

    async def rt() -> list[dict[str, Any]]:
        return [await routing.measure(n) for n in sizes["routing"]]

    async def sc() -> dict[str, Any]:
        mem = await scale.memory_and_cold_start(sizes["memory"])
        return {**mem, "stream": await scale.stream_bytes(*sizes["bytes_sample"])}

    async def sv() -> list[dict[str, Any]]:
        return [await service.measure(n) for n in sizes["service"]]

    async def tr() -> dict[str, Any]:
        return await trust.measure(**sizes["trust"])

    async def hav() -> dict[str, Any]:
        return await ha.measure(**sizes["ha"])

    async def web() -> dict[str, Any]:
        return await http.measure(**sizes["http"])

    async def tt() -> dict[str, Any]:
        return await at.measure(**sizes["at"])

    async def ch() -> dict[str, Any]:
        return await churn.measure(**sizes["churn"])

    await part("throughput", tp)
    await part("latency", lat)
    await part("routing", rt)
    await part("scale", sc)
    await part("service", sv)
    await part("trust", tr)
    await part("ha", hav)
    await part("http", web)
    await part("at", tt)
    await part("churn", ch)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--profile", action="store_true", help="py-spy the projector at saturation")
    p.add_argument("--name", help="results file name (default latest, or quick with --quick)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    if bad := [x for x in parts if x not in PARTS]:
        print(
            f"bench/run.py: unknown part(s) {', '.join(bad)}; use {', '.join(PARTS)}",
            file=sys.stderr,
        )
        return 2
    mode = "quick" if args.quick else "full"
    name = args.name or ("quick" if args.quick else "latest")
    logs.configure("warning", json=True)
    RESULTS.mkdir(exist_ok=True)
    started = time.monotonic()
    doc: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "mode": mode,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }  # fmt: skip
    doc["results"] = asyncio.run(run_parts(mode, parts, args.profile))
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(report.markdown(doc))
    print(report.markdown(doc))
    failed = [k for k, v in doc["results"].items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
