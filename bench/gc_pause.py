"""Full-GC pause and memory with 100,000 bucket records held as the projector holds them.

    .venv/bin/python bench/gc_pause.py [--count N]

Why: wire types are msgspec Structs with gc=False (no reference cycles), so the
cyclic collector skips them; this prints what a full collection then costs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry import protocol  # noqa: E402
from registry.store import Entry  # noqa: E402
from tests.factories import make_info  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000)
    count = p.parse_args().count
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    entries: dict[str, Entry] = {}
    for i in range(count):
        info = make_info(f"w{i}", tags={"zone": "eu"}, content_types=["audio", "video"])
        record = protocol.WORKER_INFO_DECODER.decode(protocol.encode(info))  # as loaded from KV
        entries[record.worker_id] = Entry(record, i)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    t0 = time.perf_counter()
    gc.collect()
    pause_ms = (time.perf_counter() - t0) * 1000
    print(f"{count} records: full GC {pause_ms:.0f} ms, {held / count:.0f} B/record, "
          f"{len(gc.get_objects())} objects tracked by the GC")  # fmt: skip


if __name__ == "__main__":
    main()
