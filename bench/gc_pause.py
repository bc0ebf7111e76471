"""Full-GC pause and memory of the per-worker state the registry holds, in-process.

    .venv/bin/python bench/gc_pause.py [--count N] [--no-share]

The simulator's registration and heartbeat bodies (agent/simulate/, as the
real agent sends them) are decoded and folded the way the projector does it:
registrations through `registry.share.Parts` (off with --no-share), records
in `Entry`s, and the sweeper's two deadline heaps armed per worker. Printed:
Python objects per worker (tracemalloc), objects the cyclic GC tracks per
worker, and what one full collection then costs. RSS figures of the running
registry are `bench/run.py`'s (its scale part); this isolates the objects.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

# run by path, Python puts bench/ first on sys.path, where bench/http.py would stand for
# the standard library's http: the repository root takes its place
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p).resolve() != _HERE)]

import msgspec  # noqa: E402

from agent.simulate import Fleet, SimSettings, sent_at_now  # noqa: E402
from registry.fold import Applied, evolve  # noqa: E402
from registry.protocol import RegisterEvent, decode_event, event_subject  # noqa: E402
from registry.server.store import Entry  # noqa: E402
from registry.share import Parts  # noqa: E402
from registry.sweep import DeadlineHeap  # noqa: E402


class _NoPublisher:
    async def publish(self, *args: object, **kwargs: object) -> None: ...


def _tracked(entries: dict[str, Entry], *heaps: DeadlineHeap) -> int:
    """Distinct objects the cyclic GC tracks among what the state holds."""
    seen: set[int] = set()
    for entry in entries.values():
        rec = entry.record
        reg, hw = rec.registration, rec.registration.hardware
        parts = (entry, rec, rec.metrics, reg, reg.location, reg.supported_content_types,
                 reg.tags, hw, hw.gpu_models, hw.gpus, *hw.gpus)  # fmt: skip
        seen.update(id(o) for o in parts if gc.is_tracked(o))
    for heap in heaps:
        seen.update(id(item) for item in heap._heap if gc.is_tracked(item))
    return len(seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--no-share", action="store_true", help="fold without registry.share.Parts")
    args = p.parse_args()
    n = args.count
    fleet = Fleet(SimSettings(count=n, heartbeat_interval_s=5.0, seed=5), _NoPublisher())
    bodies = [(event_subject("register", w.worker_id), w.register_body(5.0)) for w in fleet.workers]
    bodies += [(w.subject, w.heartbeat_body(sent_at_now(), 1.0)) for w in fleet.workers]
    parts = None if args.no_share else Parts()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    entries: dict[str, Entry] = {}
    expiry, late = DeadlineHeap(), DeadlineHeap()
    now = datetime.now(UTC)
    for seq, (subject, body) in enumerate(bodies, 1):
        event = decode_event(subject, body)
        if parts is not None and isinstance(event, RegisterEvent):
            event = msgspec.structs.replace(event, registration=parts.registration(event.registration))
        entry = entries.get(event.worker_id)
        outcome = evolve(entry.record if entry else None, event, seq, now)
        assert isinstance(outcome, Applied)
        if entry is None:
            entries[event.worker_id] = Entry(outcome.record, seq)
        else:
            entry.record, entry.revision = outcome.record, seq
        beat = outcome.record.last_heartbeat.timestamp()
        expiry.set(event.worker_id, beat, beat + 15.0)
        late.set(event.worker_id, beat, beat + 7.5)
    del bodies
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    tracked = _tracked(entries, expiry, late)
    t0 = time.perf_counter()
    gc.collect()
    pause_ms = (time.perf_counter() - t0) * 1000
    print(f"{n:,} workers{' (no sharing)' if parts is None else ''}: "
          f"{held / n:,.0f} B of Python objects per worker, "
          f"{tracked / n:.2f} objects per worker tracked by the GC, full GC {pause_ms:.0f} ms "
          f"(this process, the simulator's objects included)")  # fmt: skip


if __name__ == "__main__":
    main()
