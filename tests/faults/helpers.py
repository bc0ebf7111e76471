"""Helpers for the fault-injection tests (and bench/soak.py).

They build on tests/integration/registry_helpers.py: raw JSON bodies, a plain
nats-py client, the bucket read back as JSON. What is added here is what a
fault test needs to *account* for every event:

- `RawFleet`: N workers that register and beat at a fixed rate through
  `js.publish_async`, one heartbeat in flight per worker, each retried under its
  own Nats-Msg-Id until the stream acknowledges it (so a publish cut off by a
  server restart is stored once, in order). Its `Ledger` per worker is what was
  acknowledged: the oracle for "nothing lost, nothing applied twice".
- `stream_messages`: every message of WORKER_EVENTS, as stored.
- `projector_lag_s`: how old the oldest event is that the projector has not
  checkpointed (its consumer's ack floor), in the server's time.
- `exactly_once`: compare the bucket with the ledgers.
- `replay`: delete the bucket and the projector's consumer, rebuild with a
  fresh registry, return what it rebuilt.
- `wall_clock_jump`: move the registry host's wall clock (time.time and
  datetime.now as seen by registry/) while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.api import PubAck

from registry.cancel import raise_if_cancelled
from registry.protocol import LEASE_BUCKET, LEASE_KEY
from registry.server.provision import api as js_api
from tests.conftest import eventually, stop_task
from tests.integration.registry_helpers import (
    BUCKET,
    CONSUMER,
    EVENTS,
    bucket_records,
    heartbeat_body,
    new_incarnation,
    register_body,
    running_registry,
)

# ---------------------------------------------------------------- a fleet that accounts for every event


@dataclass
class Ledger:
    """What the stream acknowledged for one worker (each event counted once)."""

    incarnation: str
    register_seq: int = 0
    heartbeats: int = 0  # heartbeats stored (acknowledged), each once
    last_seq: int = 0  # stream sequence of the last stored event
    completed: int = 0  # metrics.completed_tasks of the last stored heartbeat
    seqs: list[int] = field(default_factory=list)

    @property
    def events(self) -> int:
        """Events the projector must apply to this worker: register + heartbeats."""
        return (1 if self.register_seq else 0) + self.heartbeats


@dataclass
class _InFlight:
    kind: str
    body: bytes
    msg_id: str
    completed: int
    future: asyncio.Future[PubAck] | None = None
    sent_at: float = 0.0
    attempts: int = 0


class RawFleet:
    """`count` workers beating `rate_hz` times a second through `js.publish_async`.

    Every event has its own random Nats-Msg-Id; until the stream acknowledges
    it, the worker sends nothing newer and retries that same event (same id),
    so a publish lost in a server restart is stored exactly once and the
    worker's events are stored in the order they were made. `declared_interval_s`
    is what the registrations promise (it sets the registry's timeout); the
    workers may beat faster than they promise.
    """

    def __init__(
        self,
        js: JetStreamContext,
        count: int,
        *,
        rate_hz: float,
        declared_interval_s: float,
        prefix: str = "raw",
        ack_timeout_s: float = 2.0,
    ) -> None:
        self.js = js
        self.rate_hz = rate_hz
        self.declared_interval_s = declared_interval_s
        self.ack_timeout_s = ack_timeout_s
        width = len(str(count - 1))
        self.ledgers = {f"{prefix}-{i:0{width}d}": Ledger(new_incarnation()) for i in range(count)}
        self.inflight: dict[str, _InFlight] = {}
        self.retries = 0
        self.publish_errors = 0
        self.last_error = ""
        self._beating = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ the ledgers

    @property
    def stored(self) -> int:
        return sum(led.events for led in self.ledgers.values())

    @property
    def last_seq(self) -> int:
        return max((led.last_seq for led in self.ledgers.values()), default=0)

    def _take(self, wid: str, item: _InFlight, ack: PubAck) -> None:
        led = self.ledgers[wid]
        if item.kind == "register":
            led.register_seq = ack.seq
        else:
            led.heartbeats += 1
            led.completed = item.completed
        led.last_seq = ack.seq
        led.seqs.append(ack.seq)

    # ------------------------------------------------------------ publishing

    async def _send(self, wid: str, item: _InFlight) -> None:
        item.attempts += 1
        item.sent_at = time.monotonic()
        if item.attempts > 1:
            self.retries += 1
        try:
            item.future = await self.js.publish_async(
                f"worker.{item.kind}.{wid}", item.body, headers={"Nats-Msg-Id": item.msg_id}
            )
        except nats.errors.Error as e:  # closed, reconnecting with a full buffer, ...
            item.future = None
            self.publish_errors += 1
            self.last_error = str(e) or type(e).__name__

    def _settled(self, wid: str, item: _InFlight) -> bool:
        """True once stored; re-sends (same id) what failed or timed out."""
        fut = item.future
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            self._take(wid, item, fut.result())
            return True
        if fut is not None and fut.done():
            self.publish_errors += 1
            self.last_error = repr(fut.exception()) if not fut.cancelled() else "cancelled"
        elif fut is not None and time.monotonic() - item.sent_at < self.ack_timeout_s:
            return False  # still waiting for its PubAck
        if fut is not None:
            fut.cancel()  # frees nats-py's pending-publish slot; a late ack is ignored
        item.future = None
        return False

    async def _pump(self, wid: str) -> bool:
        """Advance one worker by one step; True if it has nothing in flight."""
        item = self.inflight.get(wid)
        if item is None:
            return True
        if self._settled(wid, item):
            del self.inflight[wid]
            return True
        if item.future is None:
            await self._send(wid, item)
        return False

    def _heartbeat(self, wid: str) -> _InFlight:
        led = self.ledgers[wid]
        n = led.completed + 1
        body = heartbeat_body(wid, led.incarnation, completed_tasks=n, cpu=float(n % 100))
        return _InFlight("heartbeat", json.dumps(body).encode(), secrets.token_hex(16), n)

    async def register_all(self, timeout_s: float = 20.0) -> None:
        """Register every worker; returns once every registration is stored."""
        for wid, led in self.ledgers.items():
            body = register_body(wid, led.incarnation, heartbeat_interval_s=self.declared_interval_s)
            item = _InFlight("register", json.dumps(body).encode(), secrets.token_hex(16), 0)
            self.inflight[wid] = item
            await self._send(wid, item)
        await self.settle(timeout_s)

    async def _tick(self) -> None:
        for wid in self.ledgers:
            if await self._pump(wid) and self._beating:
                item = self.inflight[wid] = self._heartbeat(wid)
                await self._send(wid, item)

    async def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_at = time.monotonic()
        while True:
            await self._tick()
            raise_if_cancelled()  # nats-py's publish_async turns a cancel into an error
            next_at = max(next_at + period, time.monotonic() - period)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def settle(self, timeout_s: float) -> None:
        """Stop starting beats; wait until everything in flight is stored (bounded)."""
        deadline = time.monotonic() + timeout_s
        while self.inflight:
            for wid in list(self.inflight):
                await self._pump(wid)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(self.inflight)} events not acknowledged within {timeout_s} s "
                    f"(last error: {self.last_error})"
                )
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def beating(self, settle_s: float = 20.0) -> AsyncIterator[RawFleet]:
        """Beat while inside; on leaving, stop and wait until every beat is stored."""
        self._beating = True
        self._task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            self._beating = False
            await stop_task(self._task, "the RawFleet's beating")
            await self.settle(settle_s)


# ---------------------------------------------------------------- the oracle


@dataclass
class Verdict:
    lost: dict[str, str] = field(default_factory=dict)
    doubled: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.doubled


async def late_notices(js: JetStreamContext) -> dict[str, int]:
    """How many `worker.late.<id>` notices the stream holds per worker."""
    info = await js.stream_info("WORKER_EVENTS", subjects_filter="worker.late.*")
    return {s.rpartition(".")[2]: n for s, n in (info.state.subjects or {}).items()}


def exactly_once(
    records: dict[str, dict[str, Any]], fleet: RawFleet, lates: dict[str, int] | None = None
) -> Verdict:
    """Every acknowledged event's effect is in the bucket, none twice.

    The last stored heartbeat's counter must be the record's, its sequence the
    record's `event_seq`, and `version` must count exactly the events stored
    for the worker (register + heartbeats): fewer is an effect lost, more is
    one applied twice (or an expiry applied to a worker that beat all along).
    """
    verdict = Verdict()
    lates = lates or {}
    for wid, led in fleet.ledgers.items():
        rec = records.get(wid)
        if rec is None:
            verdict.lost[wid] = "no record"
            continue
        got = (rec["metrics"]["completed_tasks"], rec["event_seq"], rec["version"])
        want = (led.completed, led.last_seq, led.events)
        what = f"(completed, event_seq, version) = {got}, acknowledged {want}"
        # a worker whose stored beats stalled (a publish retried across a restart)
        # may have been noticed late: that notice is folded too, once
        if want[2] < got[2] <= want[2] + lates.get(wid, 0):
            got = (got[0], got[1], want[2])
        if got[2] > want[2] or rec["offline_reason"] is not None:
            verdict.doubled[wid] = what + f", offline_reason={rec['offline_reason']}"
        elif got != want:
            verdict.lost[wid] = what
    return verdict


# ---------------------------------------------------------------- reading the stream


@dataclass(frozen=True)
class StoredMsg:
    seq: int
    subject: str
    time: datetime
    data: bytes
    headers: dict[str, str]

    @property
    def kind(self) -> str:
        return self.subject.split(".")[1]

    @property
    def worker_id(self) -> str:
        return self.subject.split(".", 2)[2]

    def json(self) -> Any:
        return json.loads(self.data)


async def stream_messages(
    js: JetStreamContext, subjects: str = "worker.>", timeout_s: float = 30.0
) -> list[StoredMsg]:
    """Every message of WORKER_EVENTS on `subjects`, in stream order."""
    info = await js.stream_info(EVENTS, subjects_filter=subjects)
    total = sum((info.state.subjects or {}).values())
    if not total:
        return []
    sub = await js.subscribe(
        subjects, stream=EVENTS, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL,
        pending_msgs_limit=-1, pending_bytes_limit=-1,
    )  # fmt: skip
    out: list[StoredMsg] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(out) < total:
                m = await sub.next_msg(timeout=timeout_s)
                meta = m.metadata
                out.append(StoredMsg(meta.sequence.stream, m.subject, meta.timestamp, m.data,
                                     dict(m.headers or {})))  # fmt: skip
    finally:
        await sub.unsubscribe()
    return out


async def stream_last_seq(nc: Client) -> int:
    info = await js_api(nc, f"STREAM.INFO.{EVENTS}")
    return int(info["state"]["last_seq"])


async def projector_lag_s(nc: Client) -> float | None:
    """Age (server time) of the oldest event past the projector's checkpoint; 0 if none.

    None while the consumer does not exist (a registry is (re)creating it).
    """
    info = await js_api(nc, f"CONSUMER.INFO.{EVENTS}.{CONSUMER}")
    if "error" in info:
        return None
    floor = int(info["ack_floor"]["stream_seq"])
    nxt = await js_api(nc, f"STREAM.MSG.GET.{EVENTS}", {"seq": floor + 1, "next_by_subj": "worker.>"})
    if "error" in nxt:
        return 0.0  # nothing past the checkpoint
    if "ts" not in info:
        return None
    now = msgspec.convert(info["ts"], datetime)
    stored = msgspec.convert(nxt["message"]["time"], datetime)
    return max(0.0, (now - stored).total_seconds())


# ---------------------------------------------------------------- replay


async def replay(
    url: str, js: JetStreamContext, expected: dict[str, dict[str, Any]], timeout_s: float = 30.0,
    **settings: Any,
) -> dict[str, dict[str, Any]]:
    """Delete the bucket and the projector's consumer, rebuild with a fresh
    in-process registry, and return the rebuilt bucket as soon as every record
    has reached the `event_seq` of `expected`. The rebuilding registry judges
    nobody: its timeout is a minute and late notices are off (a late notice
    is due one 1.5-interval grace after it catches up, which a slow machine
    can pass before the bucket has been read back).
    """
    with contextlib.suppress(Exception):
        await js.delete_consumer(EVENTS, CONSUMER)
    await js.delete_stream(f"KV_{BUCKET}")
    want = {wid: r["event_seq"] for wid, r in expected.items()}

    async def rebuilt() -> dict[str, dict[str, Any]] | None:
        records = await bucket_records(js)
        return records if {w: r["event_seq"] for w, r in records.items()} == want else None

    async with running_registry(url, **{"timeout_floor_s": 60.0, "late_factor": 0.0, **settings}) as registry:
        await eventually(
            lambda: {w: r.event_seq for w, r in registry.records().items()} == want,
            timeout=timeout_s, interval=0.02,
        )  # fmt: skip
        return await eventually(rebuilt, timeout=10.0, interval=0.02)


def without(records: dict[str, dict[str, Any]], *fields: str) -> dict[str, dict[str, Any]]:
    return {wid: {k: v for k, v in r.items() if k not in fields} for wid, r in records.items()}


# ---------------------------------------------------------------- the registry host's wall clock


class WallClock:
    """The wall clock as this process sees it: real time + `offset_s`."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def jump(self, seconds: float) -> None:
        self.offset_s += seconds


_WALL_READS = ("datetime.now(", "datetime.utcnow(", "datetime.today(")


def modules_reading_wall_clock(package: str = "registry") -> list[str]:
    """Loaded modules of `package` that read the wall clock through `datetime`."""
    names = []
    for name, mod in sorted(sys.modules.items()):
        if mod is None or (name != package and not name.startswith(package + ".")):
            continue
        with contextlib.suppress(OSError, TypeError):
            source = inspect.getsource(mod)
            if getattr(mod, "datetime", None) is datetime and any(r in source for r in _WALL_READS):
                names.append(name)
    return names


def _jumped_datetime(clock: WallClock) -> type[datetime]:
    """A `datetime` whose now()/utcnow()/today() read `clock`; every other
    constructor returns plain datetimes, so values still encode."""

    class Jumped(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + timedelta(seconds=clock.offset_s)

        @classmethod
        def utcnow(cls) -> datetime:  # type: ignore[override]
            return datetime.utcnow() + timedelta(seconds=clock.offset_s)  # noqa: DTZ003

        @classmethod
        def today(cls) -> datetime:  # type: ignore[override]
            return datetime.today() + timedelta(seconds=clock.offset_s)  # noqa: DTZ002

        @classmethod
        def fromtimestamp(cls, t: float, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.fromtimestamp(t, tz)

    return Jumped


@contextlib.contextmanager
def jumpable_wall_clock(package: str = "registry") -> Iterator[WallClock]:
    """Route time.time/time_ns (process-wide) and `datetime.now` (in every module
    of `package` that calls it) through a WallClock the test can jump."""
    clock = WallClock()
    real_time, real_ns = time.time, time.time_ns
    patched = [sys.modules[name] for name in modules_reading_wall_clock(package)]
    jumped = _jumped_datetime(clock)
    time.time = lambda: real_time() + clock.offset_s  # type: ignore[assignment]
    time.time_ns = lambda: real_ns() + int(clock.offset_s * 1e9)  # type: ignore[assignment]
    for mod in patched:
        mod.datetime = jumped  # type: ignore[attr-defined]
    try:
        yield clock
    finally:
        time.time, time.time_ns = real_time, real_ns  # type: ignore[assignment]
        for mod in patched:
            mod.datetime = datetime  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the active/standby lease


async def lease_holder(js: JetStreamContext) -> tuple[str, int] | None:
    """(holder, epoch) of the registry lease as the server has it now; None when free."""
    try:
        msg = await js.get_last_msg(f"KV_{LEASE_BUCKET}", f"$KV.{LEASE_BUCKET}.{LEASE_KEY}")
    except nats.js.errors.NotFoundError:
        return None
    if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
        return None
    value = json.loads(msg.data or b"{}")
    return str(value["holder"]), int(value.get("epoch") or msg.seq or 0)


async def holder_change(js: JetStreamContext, old: str, timeout_s: float) -> tuple[str, int]:
    """Poll the lease every 20 ms until someone other than `old` holds it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = await lease_holder(js)
        if now is not None and now[0] != old:
            return now
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody took the lease over from {old} within {timeout_s} s")
