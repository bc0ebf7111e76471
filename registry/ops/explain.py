"""`registry explain`: a worker's retained history, replayed through the fold, in plain words.

PURE: events and the record in, text out. The same `fold.evolve` that built the
record narrates why it is what it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec

from registry import fold, protocol, timeparse
from registry.eventlog import StoredEvent
from registry.protocol import WorkerInfo


class Line(msgspec.Struct, frozen=True):
    seq: int
    time: datetime
    kind: str
    what: str


def replay(events: Iterable[StoredEvent]) -> list[Line]:
    """The worker's retained history through the fold, kept where something changed."""
    record: WorkerInfo | None = None
    lines: list[Line] = []
    for e in events:
        if e.event is None:
            lines.append(Line(e.seq, e.time, e.kind, f"rejected, not folded: {e.error}"))
            continue
        outcome = fold.evolve(record, e.event, e.seq, e.time)
        what = narrate(record, outcome, e)
        if isinstance(outcome, fold.Applied):
            record = outcome.record
        if what:
            lines.append(Line(e.seq, e.time, e.kind, what))
    return lines


def narrate(before: WorkerInfo | None, outcome: fold.Outcome, e: StoredEvent) -> str | None:
    match outcome:
        case fold.Duplicate():
            return None
        case fold.Ignored(reason=reason):
            if e.kind == "heartbeat" and before is not None and before.live:
                if e.event.incarnation != before.incarnation:
                    return _clash(e.event.incarnation, before.incarnation, reason)
            return f"ignored {e.kind}: {reason}"
        case fold.Unregistered(reason=reason):
            return f"rejected {e.kind}: {reason}; the agent is told to register again"
        case fold.Applied(record=after):
            return _applied(before, after, e)
    return None


def _clash(older: str, newer: str, reason: str) -> str:
    return (
        f"IDENTITY CLASH: two processes claim this id; ignored heartbeat from incarnation "
        f"{older[:8]} ({reason}), replaced by {newer[:8]}; the older is told it is superseded"
    )


def _applied(before: WorkerInfo | None, after: WorkerInfo, e: StoredEvent) -> str | None:
    if e.kind == "register":
        again = before is not None and before.incarnation != after.incarnation and before.live
        if again and before is not None:
            return (f"re-registered by a new process (incarnation {before.incarnation[:8]} is "
                    f"superseded and told so): {e.summary}")  # fmt: skip
        return e.summary
    if e.kind in ("unregister", "expired", "late", *protocol.OPERATOR_KINDS):
        return e.summary
    if before is None or not before.live:
        after_what = before.offline_reason if before else "nothing"
        return f"came back: heartbeat after {after_what} ({e.summary})"
    if (before.status, before.available) != (after.status, after.available):
        return f"now {availability_text(after)} ({e.summary})"
    return None


def availability_text(r: WorkerInfo) -> str:
    """`available: online, 1/2 tasks` / `not available: full, 2/2 tasks` / `...: status busy`."""
    tasks = f"{r.metrics.active_tasks}/{r.registration.max_concurrent_tasks} tasks"
    reason = fold.availability_reason(r)
    if r.available:
        return f"available: {r.status}, {tasks}"
    if r.cordon is not None:
        return f"not available: {cordon_text(r)}, {tasks}"
    if reason == "full":
        return f"not available: full, {tasks}"
    return f"not available: status {reason}" if r.live else f"not available: {reason}"


def cordon_text(r: WorkerInfo) -> str:
    """`cordoned by alice at 14:05:09, reason: disk replacement` ("" when not held)."""
    c = r.cordon
    if c is None:
        return ""
    why = f", reason: {c.reason}" if c.reason else ""
    return f"{fold.cordon_state(r)} by {c.by} at {_when(c.at)}{why}"


def verdict(r: WorkerInfo, events: list[StoredEvent], at: datetime) -> str:
    """One sentence: the state now and its cause."""
    held = f"; {cordon_text(r)}" if r.cordon is not None else ""
    return _verdict(r, events, at) + (held if r.offline_reason is not None else "")


def _verdict(r: WorkerInfo, events: list[StoredEvent], at: datetime) -> str:
    last = _last_event_of(events, r.offline_reason)
    if r.offline_reason is protocol.OfflineReason.EXPIRED:
        timeout = f"timeout {timeparse.format_seconds(last.timeout_s)}; " if last else ""
        return (
            f"OFFLINE: expired at {_when(r.offline_at)}, no heartbeat since "
            f"{_when(r.last_heartbeat)} "
            f"({timeout}it promised one every {r.heartbeat_interval_s:g}s)"
        )
    if r.offline_reason is protocol.OfflineReason.UNREGISTERED:
        reason = last.reason if last and last.reason else "no reason given"
        return f"OFFLINE: unregistered at {_when(r.offline_at)}, reason: {reason}"
    state, _, detail = availability_text(r).partition(": ")
    ago = timeparse.format_age((at - r.last_heartbeat).total_seconds())
    return f"{state.upper()}: {detail}; last heartbeat {ago} ago ({_when(r.last_heartbeat)})"


def _last_event_of(events: list[StoredEvent], reason: protocol.OfflineReason | None) -> Any:
    kind = {
        protocol.OfflineReason.EXPIRED: "expired",
        protocol.OfflineReason.UNREGISTERED: "unregister",
    }
    wanted = kind.get(reason) if reason else None
    return next((e.event for e in reversed(events) if e.kind == wanted and e.event), None)


def _when(t: datetime | None) -> str:
    return timeparse.format_instant(t) if t else "an unknown time"


def explanation(worker_id: str, record: WorkerInfo | None, state: str, lines: list[Line]) -> str:
    who = f"worker {worker_id}"
    if record is not None:
        reg = record.registration
        who += f" ({reg.name!r}, {reg.capability}, on {reg.location.hostname})"
    out = [who, f"  {state}", "  history (stored times, oldest first):"]
    out += [f"    {timeparse.format_instant(ln.time)}  #{ln.seq}  {ln.what}" for ln in lines]
    if not lines:
        out.append("    no events retained")
    return "\n".join(out)
