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
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, tzinfo
from typing import Any, Final, NoReturn

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from registry import protocol, query, timeparse, timetravel
from registry.connect import (
    FAIL_FAST,
    AuthError,
    NatsOptions,
    NatsUrlError,
    add_auth_arguments,
    auth_from_args,
    connect,
    is_refused,
)
from registry.eventlog import EventLogError, EventQuery, read_events
from registry.ops import actions, watch
from registry.ops.check import brake_state, holding
from registry.ops.explain import explanation, replay, verdict
from registry.ops.render import events_table, workers_at_table, workers_table
from registry.protocol import WorkerCapability, WorkerInfo, WorkerStatus
from registry.server.store import Bucket

DEFAULT_URL: Final = "nats://127.0.0.1:4222"
CONNECT_TIMEOUT_S: Final = 2.0
SERVICE_TIMEOUT_S: Final = 0.5
EXPLAIN_EVENTS: Final = 10_000

Command = Callable[[argparse.Namespace], Awaitable[int]]
ACTIONS: Final = {
    "cordon": "no new work for a worker (running tasks go on), with --reason; until uncordon",
    "uncordon": "lift a cordon or a drain: the worker may take work again",
    "drain": "cordon a worker and tell its agent to finish its tasks and leave",
}


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
    add_auth_arguments(common)

    def command(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, parents=[common], help=help, description=help)
        _one_line_errors(p)
        p.set_defaults(run=_runner(run))
        return p

    workers = command("workers", _workers, "list workers (live ones unless --all)")
    _filters(workers)
    workers.add_argument("--at", metavar="TIME",
                         help="the fleet as it was then, folded from WORKER_EVENTS: an age "
                              "(10m), RFC 3339, or a time of day (14:05, local)")  # fmt: skip
    workers.add_argument("--retention", type=_positive(float), metavar="S",
                         default=_env_seconds("REGISTRY_RETENTION_S", 86400.0),
                         help="with --at: the registry's --retention (env REGISTRY_RETENTION_S, "
                              "default 86400); offline records older are left out, as the "
                              "registry deletes them")  # fmt: skip
    command("get", _get, "print one worker's bucket record as JSON").add_argument(
        "id", metavar="ID", type=_worker_id
    )
    command("stats", _stats, "fleet counts (and projector counters when the registry answers)")
    _event_flags(command("events", _events, "audit the event log WORKER_EVENTS"))
    command("explain", _explain, "say in plain words why a worker is in its state").add_argument(
        "id", metavar="ID", type=_worker_id
    )
    for action, text in ACTIONS.items():
        actions.add_arguments(command(action, _action(action), text), _worker_id)
    brake = command("brake", _brake, "the mass-expiry brake: status, or release what it holds")
    brake.add_argument("action", choices=("status", "release"), nargs="?", default="status")
    brake.add_argument("--reason", default="", metavar="TEXT", help="release: why, for the log")
    brake.add_argument("--by", metavar="NAME", help="release: who (default as for cordon)")
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


def _env_seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


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
async def connected(args: argparse.Namespace) -> AsyncIterator[Client]:
    """A connection that fails fast: operator commands do not retry forever."""
    errors: list[Exception] = []
    url = args.nats

    async def remember(e: Exception) -> None:
        errors.append(e)

    try:
        options = NatsOptions.of(
            url, "registry-ops", connect_timeout_s=CONNECT_TIMEOUT_S, reconnect=FAIL_FAST,
            auth=auth_from_args(args),
        )  # fmt: skip
    except (NatsUrlError, AuthError) as e:
        raise OpsError(str(e), code=2) from None
    try:
        nc = await asyncio.wait_for(
            connect(options, error_cb=remember), timeout=3 * CONNECT_TIMEOUT_S
        )
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
    if is_refused(e):
        return "not authorized (the server wants credentials, --creds FILE; or these are revoked or expired)"
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


# ---------------------------------------------------------------- workers, get, stats


async def _workers(args: argparse.Namespace) -> int:
    f = filter_from(args)
    if args.at is not None:
        return await _workers_at(args, f)
    async with connected(args) as nc:
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


def local_zone() -> tzinfo | None:
    return datetime.now().astimezone().tzinfo


async def _workers_at(args: argparse.Namespace, f: query.Filter) -> int:
    """The fleet as of --at, folded from the stream; what trimming hid, said."""
    try:
        when = timeparse.parse_at(args.at, now(), local_zone())
    except timeparse.TimeParseError as e:
        raise OpsError(f"--at: {e}", code=2) from None
    async with connected(args) as nc:
        try:
            fleet = await timetravel.fleet_at(nc, when, args.retention)
        except timetravel.OutOfReach as e:
            raise OpsError(str(e)) from None
    records = query.select(fleet.records.values(), f)
    if args.json:
        emit(at_answer(fleet, records))
        return 0
    if records:
        print(workers_at_table(records, fleet))
    else:
        print("no workers then" + ("" if args.all else " (offline ones show with --all)"),
              file=sys.stderr)  # fmt: skip
    print(timetravel.summary(fleet, (r.worker_id for r in records)), file=sys.stderr)
    return 0


def at_answer(fleet: timetravel.FleetAt, records: list[WorkerInfo]) -> dict[str, object]:
    """`registry workers --at --json`: the records and what their trimmed history lacks."""
    shown = {r.worker_id for r in records}
    return {
        "at": fleet.at, "through_seq": fleet.through_seq, "events": fleet.events,
        "workers": records,
        "reach": {w: r for w, r in fleet.reach.items() if w in shown},
        "unknown": fleet.unknown, "purged": fleet.purged,
        "max_msgs_per_subject": fleet.limit,
    }  # fmt: skip


async def _get(args: argparse.Namespace) -> int:
    async with connected(args) as nc:
        record = await load_record(nc, args.id)
    if record is None:
        raise OpsError(f"no worker with id {args.id!r}")
    emit(record)
    return 0


async def _stats(args: argparse.Namespace) -> int:
    async with connected(args) as nc:
        counts = msgspec.structs.asdict(query.stats((await load_records(nc)).values()))
        counters = await service_counters(nc)
    if counters is None and not args.json:
        print("registry service not answering: projector counters left out", file=sys.stderr)
    counts.update(counters or {})
    if args.json:
        emit(counts)
    else:
        counts.update(_lease_lines(counts.pop("registry", None)))
        width = max(len(k) for k in counts)
        print("\n".join(f"{k:<{width}}   {v}" for k, v in counts.items()))
    return 0


def _lease_lines(registry: Any) -> dict[str, str]:
    """The answering process and the active one, one line each (the JSON keeps the
    structure: `registry: {instance, role, active: {holder, epoch, since}}`)."""
    if not isinstance(registry, dict):
        return {}
    active = registry.get("active") or {}
    holder = (f"{active.get('holder')} (epoch {active.get('epoch')}, since {active.get('since')})"
              if active else "none (a takeover under way?)")  # fmt: skip
    return {"active_registry": holder,
            "answered_by": f"{registry.get('instance')} ({registry.get('role')})"}  # fmt: skip


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
    async with connected(args) as nc:
        events = await read_events(nc, q)
    if args.json:
        emit(events)
    elif events:
        print(events_table(events))
    else:
        print("no events match", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- explain


async def _explain(args: argparse.Namespace) -> int:
    async with connected(args) as nc:
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


# ---------------------------------------------------------------- cordon, uncordon, drain


def _action(action: str) -> Command:
    async def act(args: argparse.Namespace) -> int:
        by = actions.operator_name(args)
        async with connected(args) as nc:
            record = await load_record(nc, args.id)
            if why := actions.refusal(action, record, args.id):
                raise OpsError(why)
            try:
                seq = await actions.publish(nc, action, args.id, by, args.reason)
            except nats.errors.NoRespondersError:
                raise OpsError(f"no stream takes worker.{action}.*: is the registry of this "
                               "version provisioned here (registry up)?") from None  # fmt: skip
            except nats.js.errors.APIError as e:
                raise OpsError(f"{action} refused: {e.description or e}") from None
            if args.no_wait:
                print(f"{action} of {args.id} stored (event {seq})")
                return 0
            after = await actions.folded(nc, args.id, seq, actions.FOLD_WAIT_S)
        line = actions.outcome_line(action, args.id, after, seq)
        if args.json:
            emit({"worker_id": args.id, "action": action, "event_seq": seq, "record": after})
        else:
            actions.print_outcome(line, after)
        return 0

    return act


# ---------------------------------------------------------------- brake


async def _brake(args: argparse.Namespace) -> int:
    body: dict[str, str] = {"action": args.action}
    if args.action == "release":
        body |= {"by": actions.operator_name(args)[:256], "reason": args.reason[:1024]}
    async with connected(args) as nc:
        answer = await brake_state(nc, SERVICE_TIMEOUT_S * 4, json.dumps(body).encode())
    if answer is None:
        raise OpsError("no active registry answered registry.brake (is one running?)")
    if "error" in answer:
        raise OpsError(str(answer["error"]))
    if args.json:
        emit(answer)
    elif args.action == "release":
        print(f"released: {answer.get('released', 0)} held expiries go out now; no brake until "
              "the fleet settles (a brake window)" if answer.get("released")
              else "the brake was not holding any expiry; none will be held for a brake window")  # fmt: skip
    elif answer.get("engaged"):
        print(f"{answer.get('phase')}: {holding(answer)}")
    else:
        print(f"off: no expiry held ({answer.get('expiries_released', 0)} released at the "
              f"limited rate since the registry started; answered by {answer.get('instance')})")  # fmt: skip
    return 0


# ---------------------------------------------------------------- watch


async def _watch(args: argparse.Namespace) -> int:
    f = filter_from(args)
    stop = asyncio.Event()
    watch.stop_on_sigint(stop)
    async with connected(args) as nc:
        records = await load_records(nc)
        view = watch.WatchView(records, f, tty=sys.stdout.isatty())
        view.draw(now())
        follower = asyncio.create_task(watch.follow_bucket(nc, records, view))
        try:
            await watch.until(stop, args.duration, view)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    return 0
