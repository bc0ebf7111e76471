"""Tables for people: the workers table, the events table, and their cells."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Final

from registry import timeparse
from registry.eventlog import StoredEvent
from registry.fold import cordon_state
from registry.protocol import WorkerInfo, WorkerStatus
from registry.timetravel import FleetAt

COLUMNS: Final = (
    "NAME", "ID", "CAPABILITY", "STATUS", "TASKS", "CPU%", "MEM%", "GPU%", "LAST HEARTBEAT", "HOST",
)  # fmt: skip


def column_widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    return [max(len(c) for c in col) for col in zip(headers, *rows, strict=False)]


def line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(r) for r in rows]
    widths = column_widths(headers, rows)
    return "\n".join(line(r, widths) for r in [headers, *rows])


def status_text(r: WorkerInfo) -> str:
    if r.offline_reason is not None:
        return f"offline ({r.offline_reason})" + (", cordoned" if r.cordon is not None else "")
    if r.cordon is not None:
        return f"{r.status} ({cordon_state(r)} by {r.cordon.by})"
    if r.live and r.status is WorkerStatus.ONLINE and not r.available:
        return "online (full)"
    return str(r.status)


def worker_row(r: WorkerInfo, at: datetime) -> list[str]:
    m, reg = r.metrics, r.registration
    return [
        reg.name, reg.worker_id, str(reg.capability), status_text(r),
        f"{m.active_tasks}/{reg.max_concurrent_tasks}", f"{m.cpu_usage_percent:.0f}",
        f"{m.memory_usage_percent:.0f}", f"{m.gpu_usage_percent:.0f}",
        timeparse.format_age((at - r.last_heartbeat).total_seconds()), reg.location.hostname,
    ]  # fmt: skip


def workers_table(records: Iterable[WorkerInfo], at: datetime) -> str:
    return table(COLUMNS, [worker_row(r, at) for r in records])


def history_text(fleet: FleetAt, worker_id: str) -> str:
    """How far a record of `registry workers --at` can be trusted (empty: complete)."""
    reach = fleet.reach.get(worker_id)
    if reach is None:
        return ""
    kinds = ",".join(reach.missing or reach.trimmed)
    return f"{reach.state} ({kinds})"


def workers_at_table(records: Iterable[WorkerInfo], fleet: FleetAt) -> str:
    """The workers table as of `fleet.at` (ages counted from then), and HISTORY: what a
    record's trimmed history lacks."""
    rows = [[*worker_row(r, fleet.at), history_text(fleet, r.worker_id)] for r in records]
    return table((*COLUMNS, "HISTORY"), rows)


def events_table(events: Iterable[StoredEvent]) -> str:
    rows = [
        (str(e.seq), timeparse.format_instant(e.time), e.kind, e.worker_id, e.summary)
        for e in events
    ]
    return table(("SEQ", "STORED", "KIND", "WORKER", "SUMMARY"), rows)
