"""The registry in a child process for the benchmarks: `registry_proc.py URL EVERY_S [SETTINGS]`.

Runs the registry as `registry up --nats URL` does (`registry.server.app.serve`;
SETTINGS: a JSON object of more RegistrySettings fields) and prints one JSON
status line every EVERY_S seconds on stdout: the projector's counters, whether
it has caught up, whether the sweeper is judging, how many records it holds,
the process's resident memory and Python's allocated memory blocks. On SIGUSR1
the next line comes after a full collection, with `measured` counting up and
the sizes of every per-worker structure. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import signal
import sys
import time
from pathlib import Path

# run by path, Python puts bench/ first on sys.path, where bench/http.py would stand for
# the standard library's http: the repository root takes its place
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p).resolve() != _HERE)]

import psutil

from registry import logs
from registry.server.app import Registry, serve
from registry.server.settings import RegistrySettings


class GcPauses:
    """Collector pauses in this process (gc.callbacks), by generation 2 and overall."""

    def __init__(self) -> None:
        self.started = 0.0
        self.count = self.gen2 = 0
        self.max_s = self.total_s = self.gen2_max_s = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        pause = time.perf_counter() - self.started
        self.count += 1
        self.total_s += pause
        self.max_s = max(self.max_s, pause)
        if info["generation"] == 2:
            self.gen2 += 1
            self.gen2_max_s = max(self.gen2_max_s, pause)

    def status(self) -> dict[str, float]:
        return {"gc_pauses": self.count, "gc_total_s": round(self.total_s, 3),
                "gc_max_ms": round(self.max_s * 1000, 1), "gc_gen2": self.gen2,
                "gc_gen2_max_ms": round(self.gen2_max_s * 1000, 1)}  # fmt: skip


def trimmed(me: psutil.Process) -> dict[str, int]:
    """RSS before and after glibc's malloc_trim(0): how much of it is memory the
    allocator holds free (not returned to the system) rather than objects."""
    before = me.memory_info().rss
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {"rss_untrimmed": before, "rss_trimmed": me.memory_info().rss}


def held(registry: Registry) -> dict[str, int]:
    """How much each per-worker structure of the registry holds now."""
    p, s = registry.projector, registry.sweeper
    return {
        "entries": len(p.entries), "catalog": len(p.catalog), "offline_index": len(p.offline),
        "markers": len(p.markers), "control_limiter": len(p._last_control),
        "sweeper_deadlines": len(s.heap), "sweeper_heap_items": len(s.heap._heap),
        "sweeper_late_items": len(s.late_heap._heap), "sweeper_silent": len(s._silent),
        "sweeper_attempts": len(s._attempts), "follower": len(registry.follower.catalog),
        "shared_parts": sum(len(c) for c in (p.parts._hardware, p.parts._gpus, p.parts._strings,
                                             p.parts._models, p.parts._types, p.parts._tags)),
    }  # fmt: skip


async def report(registry: Registry, every_s: float, measure: asyncio.Event) -> None:
    me = psutil.Process()
    pauses = GcPauses()
    measured = 0
    while True:
        detail: dict[str, object] = {}
        if measure.is_set():
            measure.clear()
            gc.collect()
            measured += 1
            detail = {"measured": measured, "held": held(registry), **trimmed(me)}
        status = {
            "t": time.time(),
            "caught_up": registry.link.is_caught_up,
            "sweeping": registry.sweeper.started,
            "records": len(registry.records()),
            "rss": me.memory_info().rss,
            "heap_blocks": sys.getallocatedblocks(),
            "cpu_s": sum(me.cpu_times()[:2]),
            **pauses.status(),
            **registry.counters(),
            **detail,
        }
        print(json.dumps(status), flush=True)
        await asyncio.sleep(every_s)


async def main(url: str, every_s: float, settings: dict[str, object]) -> None:
    """`registry up --nats URL` (projector, sweeper, query service) plus status lines."""
    logs.configure("warning", json=True)
    reporters: list[asyncio.Task[None]] = []
    measure = asyncio.Event()

    def started(registry: Registry) -> None:
        reporters.append(asyncio.create_task(report(registry, every_s, measure)))

    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, measure.set)
    try:
        await serve(RegistrySettings(nats_url=url, **settings), on_started=started)
    except asyncio.CancelledError:
        pass
    finally:
        for reporter in reporters:
            reporter.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3]) if sys.argv[3:] else {}))
