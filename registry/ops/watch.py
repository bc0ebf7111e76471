"""`registry watch`: the fleet live, redrawn on a terminal or one line per change.

It reads the bucket once, then follows every write to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from datetime import UTC, datetime
from typing import Final

import msgspec
from nats.aio.client import Client

from registry import protocol, query
from registry.ops.render import COLUMNS, column_widths, line, status_text, worker_row
from registry.protocol import WORKER_INFO_DECODER, WorkerInfo

REDRAW_S: Final = 0.25


def now() -> datetime:
    return datetime.now(UTC)


def stop_on_sigint(stop: asyncio.Event) -> None:
    if threading.current_thread() is threading.main_thread():
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)


async def until(stop: asyncio.Event, duration: float | None, view: WatchView) -> None:
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
