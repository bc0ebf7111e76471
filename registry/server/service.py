"""The query service: NATS micro service `worker-registry` over the registry's records.

    service = await start_service(nc, view)   # view: records, catalog, counters
    ...
    await service.stop()

Endpoints (JSON bodies; errors in the `Nats-Service-Error` / `-Code` headers, 400 for
a bad request or a body over 64 KiB, 404 for an unknown worker, 413 for an answer
larger than max_payload):

    registry.list     {capability?, content_type?, status?, available?, tag?, all?,
                       limit?, after?}                      -> {workers, next}
    registry.get      {worker_id}                           -> WorkerInfo
    registry.stats    {}                                    -> stats + projector counters
    registry.pick     {capability?, content_type?}          -> {worker: WorkerInfo | null}
    registry.history  {worker_id, since?, until?, limit?}   -> {events}
    registry.at       {at, ...registry.list's fields}       -> {at, through_seq, workers,
                                                                next, reach, unknown, ...}

The service answers on the projector's event loop, so no request may hold it long.
A listing is paged: workers in id order after the cursor `after` (the last id of
the previous page), at most `limit` of them (default 500, at most 5,000), cut
short to fit max_payload, and looking at no more than 5,000 records: a selective
filter may answer a short or empty page whose `next` is not null. Follow `next`
until it is null to see every worker. Stats and pick come from the counts and
the index kept by registry.catalog as records change, not from a scan: they
answer what query.stats and query.pick would over the same records.

History is read from WORKER_EVENTS by registry.eventlog, through a consumer
filtered on the worker's subjects (`worker.*.<id>`): the cost follows that
worker's events, not the size of the stream.

`registry.at` folds the stream up to a moment (registry.timetravel), a few seconds
for 40,000 events: it gives the loop up every 128 events, runs one fold at a time,
gives up past AT_MAX_EVENTS, and keeps the last few folds by moment, so the pages
of one walk (asked with the answer's absolute `at`) come from one fold.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import datetime
from functools import partial
from importlib import metadata
from typing import Annotated, Any, Final, Protocol, TypeVar

import msgspec
import nats.micro
import structlog
from msgspec import Meta
from nats.aio.client import Client
from nats.micro.request import Request, ServiceError
from nats.micro.service import Service

from registry import protocol, query, timeparse, timetravel
from registry.catalog import Catalog
from registry.eventlog import READ_CONSUMER_PREFIX, EventQuery, read_events
from registry.protocol import (
    EVENTS_STREAM,
    WorkerCapability,
    WorkerInfo,
    WorkerStatus,
)

log = structlog.get_logger("registry.service")

MAX_LIMIT: Final = 10_000
MAX_REQUEST_BYTES: Final = 64 * 1024
PAGE_DEFAULT: Final = 500
PAGE_MAX: Final = 5_000
EXAMINED_MAX: Final = 5_000  # records one listing request looks at, matching or not
ENVELOPE_BYTES: Final = 1024  # room in max_payload for the page's keys and cursor


class RegistryView(Protocol):
    """What the service reads: the registry's in-memory copy of the bucket, the same
    records indexed (registry.catalog), and counters."""

    def records(self) -> Mapping[str, WorkerInfo]: ...

    def catalog(self) -> Catalog: ...

    def counters(self) -> Mapping[str, int | float]: ...


# ---------------------------------------------------------------- requests


class ListRequest(msgspec.Struct, frozen=True, kw_only=True):
    capability: WorkerCapability | None = None
    content_type: str | None = None
    status: WorkerStatus | None = None
    available: bool | None = None
    tag: str | list[str] | dict[str, str] | None = None
    all: bool = False
    limit: Annotated[int, Meta(ge=1, le=PAGE_MAX)] = PAGE_DEFAULT
    after: str | None = None


class AtRequest(ListRequest, frozen=True, kw_only=True):
    at: str  # RFC 3339 or an age (`10m`); the answer's `at` is the moment, to the millisecond


class AtPage(msgspec.Struct, kw_only=True):
    """A page of the fleet as of `at`: `reach` for this page's records whose history was
    trimmed, `unknown` (the first 100 of `unknown_count`) for the whole fleet."""

    at: datetime
    through_seq: int
    workers: list[msgspec.Raw]
    next: str | None
    reach: dict[str, timetravel.Reach]
    unknown: list[str]
    unknown_count: int
    purged: int
    max_msgs_per_subject: int


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


class TooLarge(ValueError):
    """Maps to a 413 answer."""


class TooMuchToFold(ValueError):
    """Maps to a 413 answer: `registry.at` past AT_MAX_EVENTS."""


T = TypeVar("T")


def decode_request(data: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(data or b"{}", type=kind)
    except msgspec.DecodeError as e:
        raise BadRequest(f"bad request: {e}") from None


class Page(msgspec.Struct, kw_only=True):
    """One page of a listing: `next` is the cursor to ask `after`, null at the end."""

    workers: list[msgspec.Raw]
    next: str | None


def page(
    records: Iterator[WorkerInfo], f: query.Filter, limit: int, budget: int,
    is_last: Callable[[str], bool], examined_max: int = EXAMINED_MAX,
    extra: Callable[[WorkerInfo], int] | None = None,
) -> Page:  # fmt: skip
    """Up to `limit` matching records, encoded, in at most `budget` bytes (counting
    `extra(record)` more for each), looking at no more than `examined_max` records;
    `next` follows the last record looked at."""
    workers: list[msgspec.Raw] = []
    size, last = 0, None
    for examined, r in enumerate(records, 1):
        if query.matches(r, f):
            body = protocol.encode(r)
            size += len(body) + 1 + (extra(r) if extra else 0)
            if size > budget:
                if not workers:
                    raise TooLarge(f"worker {r.worker_id!r} alone is {len(body)} bytes")
                break
            workers.append(msgspec.Raw(body))
        last = r.worker_id
        if len(workers) == limit or examined == examined_max:
            break
    else:
        return Page(workers=workers, next=None)
    return Page(workers=workers, next=None if last is None or is_last(last) else last)


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


# ---------------------------------------------------------------- endpoints


Handler = Callable[[bytes], Awaitable[object]]


class Endpoints:
    """One method per endpoint: request bytes in, a msgspec-encodable answer out."""

    def __init__(
        self, nc: Client, view: RegistryView, events_stream: str, retention_s: float
    ) -> None:
        self.nc = nc
        self.view = view
        self.events_stream = events_stream
        self.moments = Moments(nc, events_stream, retention_s)

    async def list(self, data: bytes) -> object:
        req = decode_request(data, ListRequest)
        f = to_filter(req)
        after = None if req.after is None else checked_id(req.after)
        catalog = self.view.catalog()
        budget = self.nc.max_payload - ENVELOPE_BYTES
        return page(catalog.after(after), f, req.limit, budget, catalog.is_last)

    async def get(self, data: bytes) -> object:
        worker_id = checked_id(decode_request(data, GetRequest).worker_id)
        record = self.view.records().get(worker_id)
        if record is None:
            raise NotFound(f"no worker with id {worker_id!r}")
        return record

    async def stats(self, data: bytes) -> object:
        decode_request(data, dict[str, Any])
        counts: dict[str, object] = msgspec.structs.asdict(self.view.catalog().stats())
        lease = getattr(self.view, "lease", None)  # a registry process says who is active
        return counts | with_lag(self.view.counters()) | ({"registry": lease()} if lease else {})

    async def pick(self, data: bytes) -> object:
        req = decode_request(data, PickRequest)
        return {"worker": self.view.catalog().pick(req.capability, req.content_type)}

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

    async def at(self, data: bytes) -> object:
        req = decode_request(data, AtRequest)
        f = to_filter(req)
        after = None if req.after is None else checked_id(req.after)
        try:
            when = timeparse.parse_at(req.at, protocol.utcnow())
        except timeparse.TimeParseError as e:
            raise BadRequest(str(e)) from None
        try:
            fleet, ids = await self.moments.get(_to_ms(when))
        except timetravel.OutOfReach as e:
            raise BadRequest(str(e)) from None
        except timetravel.TooManyEvents as e:
            raise TooMuchToFold(
                f"{e}: too many for the registry to fold beside its projector; "
                "`registry workers --at` folds them in its own process"
            ) from None
        unknown = fleet.unknown[:UNKNOWN_LISTED]
        budget = self.nc.max_payload - ENVELOPE_BYTES - len(protocol.encode(unknown))
        start = 0 if after is None else bisect.bisect_right(ids, after)
        found = page((fleet.records[i] for i in ids[start:]), f, req.limit, budget,
                     lambda wid: wid == ids[-1], extra=partial(_reach_bytes, fleet))  # fmt: skip
        end = len(ids) if found.next is None else bisect.bisect_right(ids, found.next)
        shown = (w for w in ids[start:end] if w in fleet.reach)  # the page: (after, next]
        return AtPage(
            at=fleet.at, through_seq=fleet.through_seq, workers=found.workers, next=found.next,
            reach={w: fleet.reach[w] for w in shown if query.matches(fleet.records[w], f)},
            unknown=unknown,
            unknown_count=len(fleet.unknown), purged=fleet.purged, max_msgs_per_subject=fleet.limit,
        )  # fmt: skip


UNKNOWN_LISTED: Final = 100
AT_MAX_EVENTS: Final = 250_000  # a fold of about 12 s of the registry's CPU; the CLI has no cap


def _to_ms(when: datetime) -> datetime:
    """The moment as the answer writes it (milliseconds), so asking again with the
    answer's `at` finds the same fold."""
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def _reach_bytes(fleet: timetravel.FleetAt, record: WorkerInfo) -> int:
    reach = fleet.reach.get(record.worker_id)
    return 0 if reach is None else len(record.worker_id) + len(protocol.encode(reach)) + 4


class Moments:
    """Folds of the stream by moment: one at a time, the last `keep` kept `ttl_s`."""

    def __init__(
        self, nc: Client, stream: str, retention_s: float, keep: int = 4, ttl_s: float = 60.0
    ) -> None:
        self.nc, self.stream, self.retention_s = nc, stream, retention_s
        self.keep, self.ttl_s = keep, ttl_s
        self._folds: OrderedDict[datetime, tuple[float, timetravel.FleetAt, list[str]]] = (
            OrderedDict()
        )
        self._one_at_a_time = asyncio.Lock()

    async def get(self, when: datetime) -> tuple[timetravel.FleetAt, list[str]]:
        """The fleet at `when` and its worker ids in order."""
        async with self._one_at_a_time:
            now = time.monotonic()
            for key in [k for k, (t, _, _) in self._folds.items() if now - t > self.ttl_s]:
                del self._folds[key]
            if when in self._folds:
                self._folds.move_to_end(when)
                _, fleet, ids = self._folds[when]
                return fleet, ids
            fleet = await timetravel.fleet_at(self.nc, when, self.retention_s, self.stream,
                                              max_events=AT_MAX_EVENTS)  # fmt: skip
            ids = sorted(fleet.records)
            self._folds[when] = (time.monotonic(), fleet, ids)
            while len(self._folds) > self.keep:
                self._folds.popitem(last=False)
            return fleet, ids


def with_lag(counters: Mapping[str, int | float]) -> dict[str, int | float]:
    """The view's counters as they are, plus `lag`: events in the stream not yet folded
    (the projector counts them as `pending`)."""
    out = dict(counters)
    if "lag" not in out and "pending" in out:
        out["lag"] = out["pending"]
    return out


DESCRIPTIONS: Final = {
    "list": "a page of workers matching {capability?, content_type?, status?, available?, tag?,"
    " all?}, in worker id order from {after?}, at most {limit?}; {next} is the next cursor",
    "get": "the bucket record of {worker_id}",
    "stats": "fleet counts, projector counters, and which registry process is active"
    " ({registry: {instance, role, active: {holder, epoch, since}}})",
    "pick": "the least loaded available worker for {capability?, content_type?}",
    "history": "events of {worker_id} from WORKER_EVENTS {since?, until?, limit?}",
    "at": "a page of the fleet as it was at {at} (RFC 3339 or an age), folded from"
    " WORKER_EVENTS, with registry.list's filters and paging; {reach} says which records'"
    " history was trimmed",
}


class ServiceClient(Client):
    """The query service's own connection, which publishes only replies to inboxes and
    the read-only JetStream calls of `registry.history`.

    A request names its reply subject, and the answer goes out with the registry's
    permissions: a reply subject of `$JS.API.STREAM.DELETE.WORKER_EVENTS`,
    `$KV.workers.<id>` or `worker.available.<id>` would make the registry delete the
    event log or overwrite a record. Whatever a request names, this connection
    publishes nothing else (the micro service's own `$SRV` answers included).
    """

    def __init__(self, events_stream: str = EVENTS_STREAM) -> None:
        super().__init__()
        self.events_stream = events_stream
        self.refused = 0
        self._last_log = -60.0

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        if not may_publish(subject, self.events_stream):
            self.refused += 1
            if time.monotonic() - self._last_log >= 30.0:
                self._last_log = time.monotonic()
                log.warning("reply_refused", subject=subject[:200], refused=self.refused,
                            hint="a request named a reply subject that is not an inbox")  # fmt: skip
            return
        await super().publish(subject, payload, reply, headers)


def may_publish(subject: str, events_stream: str) -> bool:
    """Inboxes, and the JetStream calls that read `events_stream` through consumers
    named by registry.eventlog: nothing that writes, deletes or touches the projector."""
    if subject.startswith(("_INBOX.", "_INBOX_")):
        return True
    api = "$JS.API."
    if not subject.startswith(api):
        return False
    call = subject[len(api) :].split(".")
    if call in (["INFO"], ["STREAM", "INFO", events_stream]):
        return True
    match call:
        case ["CONSUMER", "CREATE" | "DELETE", stream, name] | [
            "CONSUMER", "MSG", "NEXT", stream, name
        ]:  # fmt: skip
            return stream == events_stream and name.startswith(READ_CONSUMER_PREFIX)
    return False


def _handler(fn: Handler, max_payload: Callable[[], int]) -> Callable[[Request], Awaitable[None]]:
    async def handle(request: Request) -> None:
        if len(request.data) > MAX_REQUEST_BYTES:
            raise ServiceError(
                "400", f"request body of {len(request.data)} bytes exceeds {MAX_REQUEST_BYTES}"
            )
        try:
            answer = await fn(request.data)
        except BadRequest as e:
            raise ServiceError("400", str(e)) from None
        except NotFound as e:
            raise ServiceError("404", str(e)) from None
        except TooLarge as e:
            raise ServiceError("413", f"{e}: more than the server's max_payload") from None
        except TooMuchToFold as e:
            raise ServiceError("413", str(e)) from None
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
    nc: Client, view: RegistryView, *, events_stream: str = EVENTS_STREAM,
    retention_s: float = 86400.0,
) -> Service:  # fmt: skip
    """Start `worker-registry` on nc; the caller stops it with `await service.stop()`.
    `retention_s`: the registry's, so `registry.at` leaves out what it had purged."""
    service = await nats.micro.add_service(
        nc, name=protocol.SERVICE_NAME, version=_version(),
        description="Worker registry: list, get, stats, pick, history and the fleet at a"
        " moment (at) of compute workers",
    )  # fmt: skip
    endpoints = Endpoints(nc, view, events_stream, retention_s)
    group = service.add_group(name="registry")
    for name, description in DESCRIPTIONS.items():
        handler = _handler(getattr(endpoints, name), lambda: nc.max_payload)
        await group.add_endpoint(name=name, handler=handler, metadata={"description": description})
    return service
