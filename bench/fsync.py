"""What each fsync policy costs: pipelined and one-at-a-time JetStream publishes.

    .venv/bin/python bench/fsync.py

The figures behind the `sync_interval` choice in nats/server.conf: 20,000
pipelined and 500 sequential 300-byte publishes per policy, each on a fresh
nats-server with a temporary store.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

# run by path, Python puts bench/ first on sys.path, where bench/http.py would stand for
# the standard library's http: the repository root takes its place
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p).resolve() != _HERE)]

import nats  # noqa: E402

from registry.server.embedded import NatsServer  # noqa: E402

POLICIES = {"default (2 min)": "jetstream { }", "1s": "jetstream { sync_interval: 1s }",
            "always": "jetstream { sync_interval: always }"}  # fmt: skip


async def measure(conf_text: str) -> tuple[float, float]:
    store = Path(tempfile.mkdtemp(prefix="fsync-"))
    conf = store / "server.conf"
    conf.write_text(conf_text)
    server = NatsServer(store, config=conf)
    nc = await nats.connect(server.start())
    try:
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.*"])
        t0 = time.perf_counter()
        futures = [await js.publish_async(f"t.{i % 100}", b"x" * 300) for i in range(20_000)]
        await asyncio.gather(*futures)
        pipelined = 20_000 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(500):
            await js.publish("t.1", b"x" * 300)
        sequential = 500 / (time.perf_counter() - t0)
    finally:
        await nc.close()
        server.stop()
    return pipelined, sequential


async def main() -> None:
    for name, conf in POLICIES.items():
        pipelined, sequential = await measure(conf)
        print(f"sync {name:16} pipelined {pipelined:8,.0f} msgs/s   sequential {sequential:6,.0f} msgs/s")


if __name__ == "__main__":
    asyncio.run(main())
