"""Reading WORKER_EVENTS by worker, kind and time: the audit log behind
`registry events`, `registry explain` and the service's `registry.history`, and
the whole stream up to a moment behind `registry workers --at` (`scan`).

Events are read through an ephemeral consumer filtered on the subjects asked
for (`worker.<kind>.<id>`, wildcards for "any"), positioned by time when
`since` is given: the cost follows the events asked for, not the size of the
stream.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, assert_never

import msgspec
from nats import nuid
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from registry import fold, protocol, timeparse
from registry.protocol import (
    EVENTS_STREAM,
    BadEvent,
    CordonEvent,
    DrainEvent,
    Event,
    ExpiredEvent,
    HeartbeatEvent,
    LateEvent,
    RegisterEvent,
    UncordonEvent,
    UnregisterEvent,
)
from registry.server.jsmeta import ack_meta

_PULL_BATCH: Final = 512
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SCAN_BATCH: Final = 512  # folded between two reads: the longest a scan holds the loop


class EventLogError(RuntimeError):
    """WORKER_EVENTS could not be read (missing stream, refused consumer)."""


class StoredEvent(msgspec.Struct, kw_only=True):
    """One message of WORKER_EVENTS as an operator reads it."""

    seq: int
    time: datetime
    kind: str
    worker_id: str
    summary: str
    event: Any = None
    error: str | None = None


@dataclass(frozen=True)
class EventQuery:
    """Which events: one worker or all, one kind or all, a time window, how many.

    With `since`, the first `limit` events from then on; without, the last `limit`.
    Oldest first either way.
    """

    worker_id: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 100

    @property
    def subject(self) -> str:
        return f"worker.{self.kind or '*'}.{self.worker_id or '*'}"


def summarize(event: Event) -> str:
    match event:
        case RegisterEvent(registration=reg):
            types = ",".join(reg.supported_content_types) or "any"
            return (
                f"registered {reg.name!r} capability={reg.capability} "
                f"slots={reg.max_concurrent_tasks} types={types} "
                f"heartbeat={event.heartbeat_interval_s:g}s incarnation={event.incarnation[:8]}"
            )
        case HeartbeatEvent(metrics=m):
            return (
                f"status={event.status} tasks={m.active_tasks} cpu={m.cpu_usage_percent:.0f}% "
                f"mem={m.memory_usage_percent:.0f}% gpu={m.gpu_usage_percent:.0f}%"
            )
        case UnregisterEvent():
            return f"unregistered: {event.reason or 'no reason given'}"
        case ExpiredEvent():
            return (
                f"expired: no heartbeat since {timeparse.format_instant(event.last_heartbeat)} "
                f"(timeout {timeparse.format_seconds(event.timeout_s)})"
            )
        case LateEvent():
            return (
                f"late: no heartbeat since {timeparse.format_instant(event.last_heartbeat)} "
                f"(announced unavailable after {timeparse.format_seconds(event.late_after_s)})"
            )
        case CordonEvent() | UncordonEvent() | DrainEvent():
            what = {CordonEvent: "cordoned", UncordonEvent: "uncordoned", DrainEvent: "drained"}
            return f"{what[type(event)]} by {event.by}: {event.reason or 'no reason given'}"
        case _:
            assert_never(event)


def _premature(event: Event, stored_at: datetime) -> str:
    """A verdict stored before the silence it claims is ignored by the fold, whatever the
    record: say so. (One claiming less than the worker's interval allows needs the
    record; `registry explain` replays it.)"""
    if isinstance(event, ExpiredEvent | LateEvent):
        claimed = event.timeout_s if isinstance(event, ExpiredEvent) else event.late_after_s
        problem = fold.silence_problem(claimed, 0.0, event.last_heartbeat, stored_at)
        if problem is not None:
            return f"; IGNORED: {problem.reason}"
    return ""


def stored_event(msg: Msg) -> StoredEvent:
    meta = msg.metadata
    _, kind, worker_id = [*msg.subject.split("."), "", ""][:3]
    event: Event | None = None
    error: str | None = None
    try:
        event = protocol.decode_event(msg.subject, msg.data)
        summary = summarize(event) + _premature(event, meta.timestamp)
    except BadEvent as e:
        summary, error = f"rejected: {e}", str(e)
    return StoredEvent(
        seq=meta.sequence.stream, time=meta.timestamp, kind=kind, worker_id=worker_id,
        summary=summary, event=event, error=error,
    )  # fmt: skip


async def read_events(nc: Client, q: EventQuery, stream: str = EVENTS_STREAM) -> list[StoredEvent]:
    """Events for the query, oldest first, read through a filtered consumer (never a scan
    of other workers' subjects)."""
    if q.since is not None:
        msgs = await _read(nc, stream, q, _by_time(q.since), take=q.limit)
    elif q.worker_id is not None:
        msgs = list(deque(await _read(nc, stream, q, {"deliver_policy": "all"}), maxlen=q.limit))
    else:
        msgs = await _read_tail(nc, stream, q)
    return [stored_event(m) for m in msgs]


READ_CONSUMER_PREFIX: Final = "read_"  # the query service may publish only for these


def _by_time(since: datetime) -> dict[str, Any]:
    return {"deliver_policy": "by_start_time", "opt_start_time": timeparse.format_instant(since)}


async def _read_tail(nc: Client, stream: str, q: EventQuery) -> list[Msg]:
    """The last `limit` events of every worker: read back from the end in growing windows."""
    state = (await nc.jetstream().stream_info(stream)).state
    if not state.messages:
        return []
    first, window = max(state.first_seq, 1), q.limit
    while True:
        start = max(first, state.last_seq - window + 1)
        start_at = {"deliver_policy": "by_start_sequence", "opt_start_seq": start}
        msgs = await _read(nc, stream, q, start_at, stop_seq=state.last_seq)
        if len(msgs) >= q.limit or start == first:
            return msgs[-q.limit :]
        window *= 4


async def _read(
    nc: Client, stream: str, q: EventQuery, start_at: dict[str, Any],
    take: int | None = None, stop_seq: int | None = None,
) -> list[Msg]:  # fmt: skip
    """Pull through an ephemeral consumer filtered on q.subject until its backlog is read."""
    # named in the subject: the server checks the name against the body, so the
    # operator role may create consumers here without being able to touch the
    # projector's (trust/roles.py denies that name)
    name = f"{READ_CONSUMER_PREFIX}{nuid.NUID().next().decode()}"
    config = {
        "name": name, "filter_subject": q.subject, "ack_policy": "none", "mem_storage": True,
        "num_replicas": 1, "inactive_threshold": 30_000_000_000, **start_at,
    }  # fmt: skip
    created = await _js_api(
        nc, f"CONSUMER.CREATE.{stream}.{name}", {"stream_name": stream, "config": config}
    )
    name, pending = created["name"], int(created["num_pending"])
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: list[Msg] = []
    try:
        while pending > 0 and (take is None or len(out) < take):
            want = min(pending, _PULL_BATCH, take - len(out) if take else _PULL_BATCH)
            batch = await _pull(nc, sub, f"{stream}.{name}", inbox, want)
            if not batch:
                break
            pending -= len(batch)
            kept = [m for m in batch if _in_window(m, q, stop_seq)]
            out += kept
            if len(kept) < len(batch):
                break
    finally:
        await sub.unsubscribe()
        await _js_api(nc, f"CONSUMER.DELETE.{stream}.{name}", None, check=False)
    return out[:take] if take is not None else out


async def scan(nc: Client, stream: str, until: datetime) -> AsyncIterator[list[Msg]]:
    """Every message of `stream` from its first, oldest first, through the last one stored
    at or before `until`, in batches (a batch is handled before the next is asked for).

    One ephemeral consumer over the whole stream, ack policy none; it stops at the first
    message stored after `until` (stored times follow the sequence). To the microsecond,
    as records and nats-py show stored times: a message stored at 12:00:00.000001500 is
    at or before 12:00:00.000001."""
    name = f"{READ_CONSUMER_PREFIX}{nuid.NUID().next().decode()}"
    config = {
        "name": name, "ack_policy": "none", "deliver_policy": "all", "mem_storage": True,
        "num_replicas": 1, "inactive_threshold": 30_000_000_000,
    }  # fmt: skip
    created = await _js_api(
        nc, f"CONSUMER.CREATE.{stream}.{name}", {"stream_name": stream, "config": config}
    )
    pending, until_ns = int(created["num_pending"]), epoch_ns(until) + 999
    puller = _BatchPuller(nc, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}")
    await puller.start()
    try:
        while pending > 0:
            batch = await puller.pull(min(pending, _SCAN_BATCH))
            if not batch:
                return
            pending -= len(batch)
            kept = [m for m in batch if ack_meta(m).stored_ns <= until_ns]
            if kept:
                yield kept
            if len(kept) < len(batch):
                return
    finally:
        await puller.stop()
        await _js_api(nc, f"CONSUMER.DELETE.{stream}.{name}", None, check=False)


class _BatchPuller:
    """No-wait pulls of a whole batch into a list by a subscription callback (a tenth of
    the cost per message of `next_msg`): a batch ends when it is full or at a status."""

    def __init__(self, nc: Client, next_subject: str) -> None:
        self.nc, self.next_subject, self.inbox = nc, next_subject, nc.new_inbox()
        self.got: list[Msg] = []
        self.want = 0
        self.done = asyncio.Event()
        self.sub: Subscription | None = None

    async def start(self) -> None:
        self.sub = await self.nc.subscribe(
            self.inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def stop(self) -> None:
        if self.sub is not None:
            await self.sub.unsubscribe()

    async def pull(self, batch: int) -> list[Msg]:
        self.got, self.want = [], batch
        self.done.clear()
        request = json.dumps({"batch": batch, "no_wait": True}).encode()
        await self.nc.publish(self.next_subject, request, reply=self.inbox)
        try:
            async with asyncio.timeout(5.0):
                await self.done.wait()
        except TimeoutError:
            raise EventLogError(f"no answer to a pull within 5 s ({len(self.got)} of {batch})")
        return self.got

    async def _on_msg(self, msg: Msg) -> None:
        if msg.headers and msg.headers.get(api.Header.STATUS):
            self.done.set()  # nothing more now (404), or the pull ended otherwise
            return
        self.got.append(msg)
        if len(self.got) >= self.want:
            self.done.set()


async def stream_info(nc: Client, stream: str, body: dict[str, Any] | None = None) -> Any:
    """The stream's info as the server answers it (`state.first_ts` and the subject
    counts that nats-py's StreamState leaves out)."""
    return await _js_api(nc, f"STREAM.INFO.{stream}", body)


def epoch_ns(when: datetime) -> int:
    """Nanoseconds since the epoch, exactly (a float timestamp is off by up to 256 ns)."""
    return (when - _EPOCH) // timedelta(microseconds=1) * 1000


async def subject_counts(nc: Client, stream: str, subjects: str) -> dict[str, int]:
    """How many messages `stream` holds now on each subject matching `subjects` (the
    server lists at most 100,000 subjects an answer: asked again from an offset)."""
    counts: dict[str, int] = {}
    while True:
        info = await stream_info(nc, stream, {"subjects_filter": subjects, "offset": len(counts)})
        page = info["state"].get("subjects") or {}
        counts.update(page)
        if not page or len(counts) >= int(info.get("total", 0)):
            return counts


def _in_window(msg: Msg, q: EventQuery, stop_seq: int | None) -> bool:
    meta = msg.metadata
    if stop_seq is not None and meta.sequence.stream > stop_seq:
        return False
    return q.until is None or meta.timestamp <= q.until


async def _pull(nc: Client, sub: Subscription, consumer: str, inbox: str, batch: int) -> list[Msg]:
    """One no-wait pull: whatever is there now, up to batch, ending at a status message."""
    request = json.dumps({"batch": batch, "no_wait": True}).encode()
    await nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{consumer}", request, reply=inbox)
    msgs: list[Msg] = []
    while len(msgs) < batch:
        msg = await sub.next_msg(timeout=5.0)
        if msg.headers and msg.headers.get(api.Header.STATUS):
            break
        msgs.append(msg)
    return msgs


async def _js_api(nc: Client, subject: str, body: dict[str, Any] | None, check: bool = True) -> Any:
    payload = json.dumps(body).encode() if body is not None else b""
    resp = json.loads((await nc.request(f"$JS.API.{subject}", payload, timeout=5.0)).data)
    if check and "error" in resp:
        error = resp["error"].get("description", "JetStream API error")
        raise EventLogError(error)
    return resp
