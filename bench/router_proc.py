"""A router in a child process for the benchmarks: `router_proc.py URL EVERY_S [{}]`.

Follows WORKER_AVAILABILITY with `registry.router.Router` and prints one JSON
status line every EVERY_S seconds on stdout: the workers in its index, how
many it forgot (purged), the last stream sequence taken, the process's
resident memory and Python's allocated memory blocks. On SIGUSR1 the next line
comes after a full collection, with `measured` counting up. Stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
from pathlib import Path

# run by path, Python puts bench/ first on sys.path, where bench/http.py would stand for
# the standard library's http: the repository root takes its place
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p).resolve() != _HERE)]

import psutil

from bench.registry_proc import trimmed
from registry import logs
from registry.router import Router


async def main(url: str, every_s: float) -> None:
    logs.configure("warning", json=True)
    task = asyncio.current_task()
    assert task is not None
    measure = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    loop.add_signal_handler(signal.SIGUSR1, measure.set)
    me, measured = psutil.Process(), 0
    router = await Router.connect(url)
    try:
        while True:
            detail = {}
            if measure.is_set():
                measure.clear()
                gc.collect()
                measured += 1
                detail = {"measured": measured, **trimmed(me)}
            status = {
                "ready": router.is_ready, "workers": len(router), "forgotten": router.forgotten,
                "profiles": len(router.index._profiles), "holds": len(router.index._expiry),
                "last_seq": router.last_seq, "rss": me.memory_info().rss,
                "heap_blocks": sys.getallocatedblocks(), **detail,
            }  # fmt: skip
            print(json.dumps(status), flush=True)
            await asyncio.sleep(every_s)
    except asyncio.CancelledError:
        pass
    finally:
        await router.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
