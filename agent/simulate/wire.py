"""Heartbeat bodies on the fast path, byte for byte what the contract encodes.

registry/protocol.py is the one definition of the wire format. Building a
HeartbeatEvent and encoding it for every beat would cost more than the rest of
the simulator at 100,000 workers, so a heartbeat body is a per-incarnation
prefix, the send time, and one `%`-format of the metrics: the bytes msgspec
writes for that HeartbeatEvent (status "online", the only one the simulator
sends). tests/unit/test_simulate_wire.py holds this to the contract: every
body the simulator sends decodes with `registry.protocol.decode_event` and
encodes back to the same bytes.

`%r` writes a float as msgspec does only between 1e-4 and 1e16 (and 0): the
simulator rounds every value to at most three decimals, so none falls outside.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import msgspec

# in WorkerMetrics' field order: cpu, memory and gpu usage (percent), active,
# completed and failed tasks, average task seconds, GPU memory used (GB)
Metrics = tuple[float, float, float, int, int, int, float, float]

_HB_PREFIX: Final = b'{"v":1,"worker_id":"%s","incarnation":"%s","sent_at":"'
_HB_REST: Final = (
    b'","status":"online","metrics":{"cpu_usage_percent":%r,"memory_usage_percent":%r,'
    b'"gpu_usage_percent":%r,"active_tasks":%d,"completed_tasks":%d,"failed_tasks":%d,'
    b'"avg_task_duration_seconds":%r,"gpu_memory_used_gb":%r}}'
)
_TIME: Final = msgspec.json.Encoder()


def heartbeat_prefix(worker_id: str, incarnation: str) -> bytes:
    """What every heartbeat of one incarnation starts with (ids need no JSON escaping)."""
    return _HB_PREFIX % (worker_id.encode(), incarnation.encode())


def heartbeat_body(prefix: bytes, sent_at: bytes, metrics: Metrics) -> bytes:
    """A HeartbeatEvent as msgspec encodes it, for the status "online"."""
    return prefix + sent_at + _HB_REST % metrics


def sent_at_now() -> bytes:
    """`datetime.now(UTC)` as msgspec writes it inside a JSON string (no quotes)."""
    return _TIME.encode(datetime.now(UTC))[1:-1]


def percent(x: float) -> float:
    """A usage clamped to 0..100, to one decimal."""
    return round(min(100.0, max(0.0, x)), 1)
