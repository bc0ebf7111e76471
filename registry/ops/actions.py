"""Operator actions: `registry cordon | uncordon | drain ID`.

Each is an event in WORKER_EVENTS (`worker.<action>.<id>`), folded like any other:
the registry's bucket record shows who did it, when and why, and a replay of the
stream reproduces it. The command publishes the event (one Nats-Msg-Id, asked again
under it if unanswered), then waits a little for the bucket to show it; a registry
that is down folds it when it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
import sys
from collections.abc import Callable
from typing import Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from registry import protocol
from registry.connect import auth_from_args
from registry.fold import cordon_state
from registry.protocol import CordonEvent, DrainEvent, UncordonEvent, WorkerInfo
from registry.server.store import Bucket

PUBLISH_TIMEOUT_S: Final = 2.0
PUBLISH_ATTEMPTS: Final = 3
FOLD_WAIT_S: Final = 5.0

EVENTS: Final = {"cordon": CordonEvent, "uncordon": UncordonEvent, "drain": DrainEvent}
DONE: Final = {"cordon": "cordoned", "uncordon": "uncordoned", "drain": "draining"}


def add_arguments(p: argparse.ArgumentParser, worker_id: Callable[[str], str]) -> None:
    p.add_argument("id", metavar="ID", type=worker_id)
    p.add_argument("--reason", default="", metavar="TEXT", type=_text(1024),
                   help="why, for the record (shown by workers and explain)")  # fmt: skip
    p.add_argument("--by", metavar="NAME", type=_text(256),
                   help="who, for the record (default: the name in --creds, else user@host)")  # fmt: skip
    p.add_argument("--no-wait", action="store_true",
                   help="return once the event is stored, without waiting for the registry "
                        "to fold it")  # fmt: skip


def _text(most: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if len(text) > most:
            raise argparse.ArgumentTypeError(f"at most {most} characters (got {len(text)})")
        return text

    return parse


def operator_name(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    identity = auth_from_args(args).identity
    if identity:
        return identity
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:256]


def refusal(action: str, record: WorkerInfo | None, worker_id: str) -> str | None:
    """Why the fold would ignore this action, said before anything is published."""
    if record is None:
        return f"no worker with id {worker_id!r}"
    cordon = record.cordon
    if action == "uncordon" and cordon is None:
        return f"{worker_id} is not cordoned"
    if action == "cordon" and cordon is not None and cordon.drain:
        return f"{worker_id} is {_described(record)}; uncordon it first"
    live = record.incarnation if record.live else ""
    if action == "drain" and cordon is not None and cordon.drain and cordon.incarnation == live:
        return f"{worker_id} is already {_described(record)}"
    return None


def _described(record: WorkerInfo) -> str:
    """`draining by bob at 2026-12-07T15:21:49+00:00: kernel update`."""
    cordon = record.cordon
    assert cordon is not None
    why = f": {cordon.reason}" if cordon.reason else ""
    return (f"{cordon_state(record)} by {cordon.by} at "
            f"{cordon.at.isoformat(timespec='seconds')}{why}")  # fmt: skip


async def publish(nc: Client, action: str, worker_id: str, by: str, reason: str) -> int:
    """Store the operator event; its WORKER_EVENTS sequence."""
    event = EVENTS[action](worker_id=worker_id, by=by, reason=reason, sent_at=protocol.utcnow())
    js = nc.jetstream()
    headers = {"Nats-Msg-Id": protocol.new_msg_id()}  # asked again under the same id
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            ack = await js.publish(
                protocol.event_subject(action, worker_id), protocol.encode(event),
                timeout=PUBLISH_TIMEOUT_S, headers=headers,
            )  # fmt: skip
            return int(ack.seq)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            if attempt == PUBLISH_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


async def folded(nc: Client, worker_id: str, seq: int, timeout_s: float) -> WorkerInfo | None:
    """The record once the registry folded the event at `seq` (None if not in time)."""
    bucket = Bucket(nc)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        entry = await bucket.get(worker_id)
        if entry is not None and entry.record.event_seq >= seq:
            return entry.record
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(0.1)


def outcome_line(action: str, worker_id: str, record: WorkerInfo | None, seq: int) -> str:
    if record is None:
        return (f"{action} of {worker_id} stored (event {seq}); the registry has not folded it "
                f"within {FOLD_WAIT_S:g}s: is it running? It folds it when it starts")  # fmt: skip
    if record.cordon is None:
        return f"{worker_id}: uncordoned, {'available' if record.available else 'not available'}"
    said = _described(record)
    if action == "drain" and not record.live:
        return f"{worker_id}: {said} (offline: nobody to tell; it stays cordoned)"
    if action == "drain":
        return f"{worker_id}: {said}; its agent is told to finish its tasks and leave"
    return f"{worker_id}: {said}; running tasks go on, no new work"


def print_outcome(line: str, record: WorkerInfo | None) -> None:
    print(line, file=sys.stdout if record is not None else sys.stderr)
