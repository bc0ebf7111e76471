"""The query service: NATS micro service `worker-registry` over query.py and the event log.

    service = await start_service(nc, view)   # view: the registry's in-memory records
    ...
    await service.stop()

Endpoints (JSON bodies; errors in the `Nats-Service-Error` / `-Code` headers, 400 for
a bad request, 404 for an unknown worker, 413 for an answer larger than max_payload):

    registry.list     {capability?, content_type?, status?, available?, tag?, all?} -> {workers}
    registry.get      {worker_id}                           -> WorkerInfo
    registry.stats    {}                                    -> stats + projector counters
    registry.pick     {capability?, content_type?}          -> {worker: WorkerInfo | null}
    registry.history  {worker_id, since?, until?, limit?}   -> {events}

History is read from WORKER_EVENTS through a consumer filtered on the worker's
subjects (`worker.*.<id>`), positioned by time when `since` is given: the cost
follows that worker's events, not the size of the stream.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import Annotated, Any, Final, Protocol, TypeVar, assert_never

import msgspec
import nats.micro
from msgspec import Meta
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from nats.micro.request import Request, ServiceError
from nats.micro.service import Service

from registry import protocol, query, timeparse
from registry.protocol import (
    EVENTS_STREAM,
    BadEvent,
    Event,
    ExpiredEvent,
    HeartbeatEvent,
    LateEvent,
    RegisterEvent,
    UnregisterEvent,
    WorkerCapability,
    WorkerInfo,
    WorkerStatus,
)

MAX_LIMIT: Final = 10_000
_PULL_BATCH: Final = 512


class RegistryView(Protocol):
    """What the service reads: the registry's in-memory copy of the bucket, and counters."""

    def records(self) -> Mapping[str, WorkerInfo]: ...

    def counters(self) -> Mapping[str, int | float]: ...


# ---------------------------------------------------------------- requests


class ListRequest(msgspec.Struct, frozen=True, kw_only=True):
    capability: WorkerCapability | None = None
    content_type: str | None = None
    status: WorkerStatus | None = None
    available: bool | None = None
    tag: str | list[str] | dict[str, str] | None = None
    all: bool = False


class GetRequest(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str


class PickRequest(msgspec.Struct, frozen=True, kw_only=True):
    capability: WorkerCapability | None = None
    content_type: str | None = None


class HistoryRequest(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    since: str | None = None
    until: str | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_LIMIT)] = 100


class BadRequest(ValueError):
    """Maps to a 400 answer."""


class NotFound(LookupError):
    """Maps to a 404 answer."""


class EventLogError(RuntimeError):
    """WORKER_EVENTS could not be read (missing stream, refused consumer)."""


T = TypeVar("T")


def decode_request(data: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(data or b"{}", type=kind)
    except msgspec.DecodeError as e:
        raise BadRequest(f"bad request: {e}") from None


def to_filter(req: ListRequest) -> query.Filter:
    return query.Filter(
        capability=req.capability, content_type=req.content_type, status=req.status,
        available=req.available, tags=_tags(req.tag), include_offline=req.all,
    )  # fmt: skip


def _tags(tag: str | list[str] | dict[str, str] | None) -> dict[str, str]:
    """`"k=v"`, `["k=v", ...]` or `{"k": "v"}`."""
    if isinstance(tag, dict):
        return tag
    try:
        return query.parse_tags([tag] if isinstance(tag, str) else tag or [])
    except query.QueryError as e:
        raise BadRequest(str(e)) from None


def checked_id(worker_id: str) -> str:
    try:
        return protocol.validate_worker_id(worker_id)
    except protocol.InvalidWorkerId as e:
        raise BadRequest(str(e)) from None


# ---------------------------------------------------------------- history


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
        case _:
            assert_never(event)


def stored_event(msg: Msg) -> StoredEvent:
    meta = msg.metadata
    _, kind, worker_id = [*msg.subject.split("."), "", ""][:3]
    event: Event | None = None
    error: str | None = None
    try:
        event = protocol.decode_event(msg.subject, msg.data)
        summary = summarize(event)
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
    config = {
        "filter_subject": q.subject, "ack_policy": "none", "mem_storage": True,
        "num_replicas": 1, "inactive_threshold": 30_000_000_000, **start_at,
    }  # fmt: skip
    created = await _js_api(
        nc, f"CONSUMER.CREATE.{stream}", {"stream_name": stream, "config": config}
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


# ---------------------------------------------------------------- endpoints


Handler = Callable[[bytes], Awaitable[object]]


class Endpoints:
    """One method per endpoint: request bytes in, a msgspec-encodable answer out."""

    def __init__(self, nc: Client, view: RegistryView, events_stream: str) -> None:
        self.nc = nc
        self.view = view
        self.events_stream = events_stream

    async def list(self, data: bytes) -> object:
        f = to_filter(decode_request(data, ListRequest))
        return {"workers": query.select(self.view.records().values(), f)}

    async def get(self, data: bytes) -> object:
        worker_id = checked_id(decode_request(data, GetRequest).worker_id)
        record = self.view.records().get(worker_id)
        if record is None:
            raise NotFound(f"no worker with id {worker_id!r}")
        return record

    async def stats(self, data: bytes) -> object:
        decode_request(data, dict[str, Any])
        counts: dict[str, object] = msgspec.structs.asdict(
            query.stats(self.view.records().values())
        )
        return counts | with_lag(self.view.counters())

    async def pick(self, data: bytes) -> object:
        req = decode_request(data, PickRequest)
        return {
            "worker": query.pick(self.view.records().values(), req.capability, req.content_type)
        }

    async def history(self, data: bytes) -> object:
        req = decode_request(data, HistoryRequest)
        worker_id = checked_id(req.worker_id)
        try:
            since, until = timeparse.parse_range(req.since, req.until, protocol.utcnow())
        except timeparse.TimeParseError as e:
            raise BadRequest(str(e)) from None
        q = EventQuery(worker_id=worker_id, since=since, until=until, limit=req.limit)
        events = await read_events(self.nc, q, self.events_stream)
        if not events and worker_id not in self.view.records():
            raise NotFound(f"no worker with id {worker_id!r} and no events for it")
        return {"events": events}


def with_lag(counters: Mapping[str, int | float]) -> dict[str, int | float]:
    """The view's counters as they are, plus `lag`: events in the stream not yet folded
    (the projector counts them as `pending`)."""
    out = dict(counters)
    if "lag" not in out and "pending" in out:
        out["lag"] = out["pending"]
    return out


DESCRIPTIONS: Final = {
    "list": "workers matching {capability?, content_type?, status?, available?, tag?, all?}",
    "get": "the bucket record of {worker_id}",
    "stats": "fleet counts and projector counters",
    "pick": "the least loaded available worker for {capability?, content_type?}",
    "history": "events of {worker_id} from WORKER_EVENTS {since?, until?, limit?}",
}


def _handler(fn: Handler, max_payload: Callable[[], int]) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        try:
            answer = await fn(request.data)
        except BadRequest as e:
            raise ServiceError("400", str(e)) from None
        except NotFound as e:
            raise ServiceError("404", str(e)) from None
        body = protocol.encode(answer)
        if len(body) > max_payload():
            raise ServiceError(
                "413", f"answer of {len(body)} bytes exceeds the server's max_payload of "
                f"{max_payload()}: narrow the request (filters, limit)",
            )  # fmt: skip
        await request.respond(body)

    return handle


def _version() -> str:
    try:
        return metadata.version("worker-registry")
    except metadata.PackageNotFoundError:
        return "0.0.0"


async def start_service(
    nc: Client, view: RegistryView, *, events_stream: str = EVENTS_STREAM
) -> Service:
    """Start `worker-registry` on nc; the caller stops it with `await service.stop()`."""
    service = await nats.micro.add_service(
        nc, name=protocol.SERVICE_NAME, version=_version(),
        description="Worker registry: list, get, stats, pick and history of compute workers",
    )  # fmt: skip
    endpoints = Endpoints(nc, view, events_stream)
    group = service.add_group(name="registry")
    for name, description in DESCRIPTIONS.items():
        handler = _handler(getattr(endpoints, name), lambda: nc.max_payload)
        await group.add_endpoint(name=name, handler=handler, metadata={"description": description})
    return service
