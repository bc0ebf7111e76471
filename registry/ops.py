"""Operator commands: `registry workers | get | stats | events | explain | watch`.

They read NATS directly (the bucket `workers`, the stream WORKER_EVENTS), so they
work while the registry itself is down; `stats` adds the projector's counters
when the query service answers. Tables for people, `--json` for programs. Every
failure is one line on stderr and a non-zero exit: 1 at run time, 2 for bad
arguments; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from registry import protocol, query, timeparse
from registry.explain import explanation, replay, verdict
from registry.protocol import WORKER_INFO_DECODER, WorkerCapability, WorkerInfo, WorkerStatus
from registry.service import EventLogError, EventQuery, StoredEvent, read_events
from registry.store import Bucket

DEFAULT_URL: Final = "nats://127.0.0.1:4222"
CONNECT_TIMEOUT_S: Final = 2.0
SERVICE_TIMEOUT_S: Final = 0.5
EXPLAIN_EVENTS: Final = 10_000
COLUMNS: Final = (
    "NAME", "ID", "CAPABILITY", "STATUS", "TASKS", "CPU%", "MEM%", "GPU%", "LAST HEARTBEAT", "HOST",
)  # fmt: skip

Command = Callable[[argparse.Namespace], Awaitable[int]]


class OpsError(Exception):
    """One line for the operator, and the exit code."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- argument parsing


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the operator commands to the `registry` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--nats",
        default=os.environ.get("NATS_URL") or DEFAULT_URL,
        help=f"NATS server URL (env NATS_URL, default {DEFAULT_URL})",
    )
    common.add_argument("--json", action="store_true", help="print JSON for programs")

    def command(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, parents=[common], help=help, description=help)
        _one_line_errors(p)
        p.set_defaults(run=_runner(run))
        return p

    _filters(command("workers", _workers, "list workers (live ones unless --all)"))
    command("get", _get, "print one worker's bucket record as JSON").add_argument(
        "id", metavar="ID", type=_worker_id
    )
    command("stats", _stats, "fleet counts (and projector counters when the registry answers)")
    _event_flags(command("events", _events, "audit the event log WORKER_EVENTS"))
    command("explain", _explain, "say in plain words why a worker is in its state").add_argument(
        "id", metavar="ID", type=_worker_id
    )
    watch = command("watch", _watch, "live view of the fleet, redrawn as it changes")
    _filters(watch)
    watch.add_argument("--duration", type=_positive(float), metavar="S",
                       help="stop after S seconds (default: until Ctrl-C)")  # fmt: skip


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="include offline records")
    p.add_argument("--capability", choices=[c.value for c in WorkerCapability])
    p.add_argument("--status", choices=[s.value for s in WorkerStatus])
    p.add_argument("--available", action="store_true", help="only workers that can take a job")
    p.add_argument("--content-type", metavar="T", help="workers that list T (or list none)")
    p.add_argument("--tag", action="append", default=[], metavar="K=V", help="repeatable")


def _event_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker", type=_worker_id, metavar="ID", help="one worker's events only")
    p.add_argument("--kind", choices=protocol.EVENT_KINDS)
    p.add_argument("--since", metavar="T", help="age (1h, 30m) or RFC 3339; first events from then")
    p.add_argument("--until", metavar="T", help="age or RFC 3339")
    p.add_argument("--limit", type=_positive(int), default=100, metavar="N",
                   help="at most N events (default 100; the latest N unless --since)")  # fmt: skip


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: {message}\n")

    parser.error = error  # type: ignore[method-assign]


def _worker_id(text: str) -> str:
    try:
        return protocol.validate_worker_id(text)
    except protocol.InvalidWorkerId as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value

    return parse


def filter_from(args: argparse.Namespace) -> query.Filter:
    try:
        tags = query.parse_tags(args.tag)
    except query.QueryError as e:
        raise OpsError(str(e), code=2) from None
    return query.Filter(
        capability=WorkerCapability(args.capability) if args.capability else None,
        status=WorkerStatus(args.status) if args.status else None,
        available=True if args.available else None,
        content_type=args.content_type, tags=tags, include_offline=args.all,
    )  # fmt: skip


# ---------------------------------------------------------------- running


def _runner(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(_guarded(command, args))
        except OpsError as e:
            print(f"registry: {e}", file=sys.stderr)
            return e.code
        except KeyboardInterrupt:
            return 0
        except BrokenPipeError:  # `registry workers | head`: the reader left; so do we
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return run


async def _guarded(command: Command, args: argparse.Namespace) -> int:
    """Turn every failure into an OpsError: one line, never a traceback."""
    try:
        return await command(args)
    except (OpsError, BrokenPipeError):
        raise
    except nats.js.errors.NotFoundError as e:
        what = e.description or str(e)
        raise OpsError(f"not found at {args.nats}: {what} (is the registry provisioned?)") from None
    except nats.errors.NoRespondersError:
        raise OpsError(f"JetStream is not enabled on {args.nats}") from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise OpsError(f"NATS at {args.nats} did not answer in time") from None
    except (nats.errors.Error, EventLogError) as e:
        raise OpsError(f"{type(e).__name__}: {e}") from None
    except Exception as e:  # the one place that decides: a line, exit 1
        raise OpsError(f"unexpected error: {e!r}") from None


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[Client]:
    """A connection that fails fast: operator commands do not retry forever."""
    errors: list[Exception] = []

    async def remember(e: Exception) -> None:
        errors.append(e)

    try:
        nc = await asyncio.wait_for(nats.connect(
            url, connect_timeout=CONNECT_TIMEOUT_S, allow_reconnect=False,
            max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=remember,
            name="registry-ops",
        ), timeout=3 * CONNECT_TIMEOUT_S)  # fmt: skip
    except Exception as e:  # any failure to connect is one line
        raise OpsError(f"cannot reach NATS at {url}: {_why(errors[-1] if errors else e)}") from None
    try:
        yield nc
    finally:
        await nc.close()


def _why(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is nats-server running?)"
    if isinstance(e, socket.gaierror):
        return "unknown host"
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT_S:g}s"
    return str(e) or type(e).__name__


def emit(obj: object) -> None:
    print(msgspec.json.format(protocol.encode(obj), indent=2).decode())


def now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- reading the bucket


async def load_records(nc: Client) -> dict[str, WorkerInfo]:
    try:
        entries, _ = await Bucket(nc).load_all()
    except nats.js.errors.NotFoundError:
        raise OpsError(
            f"no bucket {protocol.BUCKET!r}: has the registry been started here?"
        ) from None
    return {k: e.record for k, e in entries.items()}


async def load_record(nc: Client, worker_id: str) -> WorkerInfo | None:
    try:
        entry = await Bucket(nc).get(worker_id)
    except nats.js.errors.BucketNotFoundError:
        raise OpsError(
            f"no bucket {protocol.BUCKET!r}: has the registry been started here?"
        ) from None
    return entry.record if entry else None


# ---------------------------------------------------------------- tables


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
        return f"offline ({r.offline_reason})"
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


# ---------------------------------------------------------------- workers, get, stats


async def _workers(args: argparse.Namespace) -> int:
    f = filter_from(args)
    async with connected(args.nats) as nc:
        records = query.select((await load_records(nc)).values(), f)
    if args.json:
        emit(records)
    elif records:
        print(workers_table(records, now()))
    else:
        print(
            "no workers" + ("" if args.all else " (offline ones show with --all)"), file=sys.stderr
        )
    return 0


async def _get(args: argparse.Namespace) -> int:
    async with connected(args.nats) as nc:
        record = await load_record(nc, args.id)
    if record is None:
        raise OpsError(f"no worker with id {args.id!r}")
    emit(record)
    return 0


async def _stats(args: argparse.Namespace) -> int:
    async with connected(args.nats) as nc:
        counts = msgspec.structs.asdict(query.stats((await load_records(nc)).values()))
        counters = await service_counters(nc)
    if counters is None and not args.json:
        print("registry service not answering: projector counters left out", file=sys.stderr)
    counts.update(counters or {})
    if args.json:
        emit(counts)
    else:
        width = max(len(k) for k in counts)
        print("\n".join(f"{k:<{width}}   {v}" for k, v in counts.items()))
    return 0


async def service_counters(nc: Client) -> dict[str, Any] | None:
    """The projector counters from `registry.stats`, or None when the service is down."""
    try:
        msg = await nc.request("registry.stats", b"{}", timeout=SERVICE_TIMEOUT_S)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    if (msg.headers or {}).get("Nats-Service-Error"):
        return None
    answer = json.loads(msg.data)
    skip = set(query.Stats.__struct_fields__)
    return {k: v for k, v in answer.items() if k not in skip}


# ---------------------------------------------------------------- events


def event_query(args: argparse.Namespace) -> EventQuery:
    try:
        since, until = timeparse.parse_range(args.since, args.until, now())
    except timeparse.TimeParseError as e:
        raise OpsError(str(e), code=2) from None
    return EventQuery(
        worker_id=args.worker, kind=args.kind, since=since, until=until, limit=args.limit
    )


async def _events(args: argparse.Namespace) -> int:
    q = event_query(args)
    async with connected(args.nats) as nc:
        events = await read_events(nc, q)
    if args.json:
        emit(events)
    elif events:
        print(events_table(events))
    else:
        print("no events match", file=sys.stderr)
    return 0


def events_table(events: Iterable[StoredEvent]) -> str:
    rows = [
        (str(e.seq), timeparse.format_instant(e.time), e.kind, e.worker_id, e.summary)
        for e in events
    ]
    return table(("SEQ", "STORED", "KIND", "WORKER", "SUMMARY"), rows)


# ---------------------------------------------------------------- explain


async def _explain(args: argparse.Namespace) -> int:
    async with connected(args.nats) as nc:
        record = await load_record(nc, args.id)
        events = await read_events(nc, EventQuery(worker_id=args.id, limit=EXPLAIN_EVENTS))
    if record is None and not events:
        raise OpsError(f"no worker with id {args.id!r}")
    lines = replay(events)
    state = (
        verdict(record, events, now()) if record else "not in the bucket (purged after retention)"
    )
    if args.json:
        emit({"worker_id": args.id, "state": state, "record": record, "timeline": lines})
        return 0
    print(explanation(args.id, record, state, lines))
    return 0


# ---------------------------------------------------------------- watch

REDRAW_S: Final = 0.25


async def _watch(args: argparse.Namespace) -> int:
    f = filter_from(args)
    stop = asyncio.Event()
    _stop_on_sigint(stop)
    async with connected(args.nats) as nc:
        records = await load_records(nc)
        view = WatchView(records, f, tty=sys.stdout.isatty())
        view.draw(now())
        follower = asyncio.create_task(follow_bucket(nc, records, view))
        try:
            await _until(stop, args.duration, view)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    return 0


def _stop_on_sigint(stop: asyncio.Event) -> None:
    if threading.current_thread() is threading.main_thread():
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)


async def _until(stop: asyncio.Event, duration: float | None, view: WatchView) -> None:
    """Until SIGINT or the duration is over; a terminal is redrawn a few times a second."""
    deadline = time.monotonic() + duration if duration else None
    while not stop.is_set():
        left = deadline - time.monotonic() if deadline else REDRAW_S
        if left <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(left, REDRAW_S))
        view.tick(now())


def watch_key(r: WorkerInfo) -> tuple[object, ...]:
    """What a change line is printed for: not the load figures of every heartbeat."""
    reg = r.registration
    return (status_text(r), r.metrics.active_tasks, reg.max_concurrent_tasks, reg.name)


class WatchView:
    """Redrawn in place on a terminal; one appended row per change otherwise (`kubectl -w`)."""

    def __init__(self, records: dict[str, WorkerInfo], f: query.Filter, tty: bool) -> None:
        self.records = records
        self.filter = f
        self.changes = msgspec.structs.replace(f, include_offline=True)  # show who leaves
        self.tty = tty
        self.widths = [len(h) for h in COLUMNS]
        self.dirty = False
        self.drawn_at = 0.0

    def draw(self, at: datetime) -> None:
        shown = query.select(self.records.values(), self.filter)
        rows = [worker_row(r, at) for r in shown]
        self.widths = [
            max(a, b) for a, b in zip(self.widths, column_widths(COLUMNS, rows), strict=True)
        ]
        text = "\n".join(line(r, self.widths) for r in [COLUMNS, *rows])
        if self.tty:
            head = f"registry watch   {len(shown)} workers   {at:%H:%M:%S} UTC   Ctrl-C to stop"
            text = f"\x1b[H\x1b[2J{head}\n\n{text}"
        print(text, flush=True)
        self.dirty, self.drawn_at = False, time.monotonic()

    def changed(self, before: WorkerInfo | None, after: WorkerInfo, at: datetime) -> None:
        if self.tty:
            self.dirty = True
        elif query.matches(after, self.changes) and (
            before is None or watch_key(before) != watch_key(after)
        ):
            print(line(worker_row(after, at), self.widths), flush=True)

    def tick(self, at: datetime) -> None:
        """On a terminal: redraw after changes, and every second for the ages."""
        if self.tty and (self.dirty or time.monotonic() - self.drawn_at >= 1.0):
            self.draw(at)


async def follow_bucket(nc: Client, records: dict[str, WorkerInfo], view: WatchView) -> None:
    """Every change of the bucket from now on, into `records` and onto the screen."""
    kv = await nc.jetstream().key_value(protocol.BUCKET)
    watcher = await kv.watchall()
    try:
        async for entry in watcher:
            if entry is None:
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                records.pop(entry.key, None)
                continue
            with contextlib.suppress(msgspec.DecodeError):
                record = WORKER_INFO_DECODER.decode(entry.value)
                before = records.get(entry.key)
                if before != record:
                    records[entry.key] = record
                    view.changed(before, record, now())
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
