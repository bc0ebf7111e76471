"""`agent simulate`: a fleet of simulated workers in one process, on one connection.

Each simulated worker sends what the real agent sends: a RegisterEvent with
realistic hardware and location, then heartbeats whose load wanders within
its `max_concurrent_tasks`, and an UnregisterEvent when it leaves; every event
with its own random `Nats-Msg-Id`. It is cheap enough for 100,000 workers on a
small machine beside the registry:

- one schedule (`Schedule`) spreads all heartbeats evenly over the interval;
  there is no task, timer or coroutine per worker;
- heartbeat bodies are a per-incarnation prefix plus one `%`-format of the
  metrics (byte for byte what msgspec encodes for a HeartbeatEvent);
- publishes are pipelined (`AckedPublisher`): a JetStream publish is a core
  publish with a reply subject, answered by a PubAck; we count the answers on
  one subscription and keep at most `window` unanswered. That is what
  `js.publish_async` does, at a third of its cost per event (it builds a
  future, an inbox and a PubAck object per message).

Churn R is the fraction of the fleet per minute that either restarts
(unregisters, registers again shortly after as a new incarnation) or dies
silently (stops beating, and after a while comes back as a new incarnation).
`--kill N` makes N workers die silently, for good, at random moments.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import heapq
import os
import random
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final, NoReturn, Protocol

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from registry import logs
from registry.protocol import (
    CONTROL_DECODER,
    DEFAULT_CONTENT_TYPES,
    GpuInfo,
    HardwareInfo,
    RegisterEvent,
    UnregisterEvent,
    WorkerCapability,
    WorkerLocation,
    WorkerRegistration,
    encode,
    event_subject,
    new_incarnation,
    new_msg_id,
)

log = structlog.get_logger("agent.simulate")

ALIVE: Final = 0
DOWN: Final = 1  # silent or restarting; comes back as a new incarnation
DEAD: Final = 2  # killed for good
NEW: Final = 3  # not registered yet (during --ramp)

_HB_PREFIX: Final = b'{"v":1,"worker_id":"%s","incarnation":"%s","sent_at":"'
_HB_REST: Final = (
    b'","status":"online","metrics":{"cpu_usage_percent":%r,"memory_usage_percent":%r,'
    b'"gpu_usage_percent":%r,"active_tasks":%d,"completed_tasks":%d,"failed_tasks":%d,'
    b'"avg_task_duration_seconds":%r,"gpu_memory_used_gb":%r}}'
)
_TIME: Final = msgspec.json.Encoder()


# ---------------------------------------------------------------- settings


class SimSettings(BaseModel):
    """What a person configures about a simulated fleet, validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats_url: str = "nats://127.0.0.1:4222"
    count: int = Field(default=200, ge=1, le=1_000_000)
    heartbeat_interval_s: float = Field(default=5.0, gt=0.0, le=86400.0)
    churn: float = Field(default=0.0, ge=0.0, le=60.0)  # fraction of the fleet per minute
    duration_s: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    id_prefix: str = Field(default="sim", pattern=r"^[A-Za-z0-9_-]{1,100}$")
    unregister: bool = True
    ramp_s: float = Field(default=0.0, ge=0.0)  # spread the registrations over this long
    kill: int = Field(default=0, ge=0)
    kill_after_s: float = Field(default=0.0, ge=0.0)
    kill_within_s: float = Field(default=10.0, ge=0.0)
    window: int = Field(default=4096, ge=1, le=1_000_000)
    tick_s: float = Field(default=0.01, gt=0.0, le=1.0)
    stop_timeout_s: float = Field(default=10.0, gt=0.0)

    @field_validator("nats_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError("expected a NATS URL such as nats://127.0.0.1:4222")
        return v


# ---------------------------------------------------------------- the schedule


class Schedule:
    """Heartbeats of n workers spread evenly over one interval, in a fixed order.

    Beat k (counted from `start`) is due at start + k * interval / n and belongs
    to the worker in slot k mod n. `due(now)` hands out every beat that came due
    since the last call; after a stall longer than an interval each worker
    beats once, not once per missed interval (as a real agent would).
    """

    def __init__(self, order: Sequence[int], interval_s: float, start: float) -> None:
        self.order = list(order)
        self.n = len(self.order)
        self.interval_s = interval_s
        self.start = start
        self.issued = 0

    def due(self, now: float) -> list[int]:
        target = int((now - self.start) * self.n / self.interval_s)
        if target - self.issued > self.n:
            self.issued = target - self.n
        if target <= self.issued:
            return []
        n, order = self.n, self.order
        out = [order[k % n] for k in range(self.issued, target)]
        self.issued = target
        return out

    def lag(self, now: float) -> float:
        """How late the oldest beat not yet handed out is (0 when none is due)."""
        return max(0.0, now - (self.start + (self.issued + 1) * self.interval_s / self.n))


# ---------------------------------------------------------------- publishing


class Publisher(Protocol):
    """Where the fleet's events go (an AckedPublisher; tests pass a recorder)."""

    acked: int
    errors: int
    timeouts: int
    duplicates: int
    last_error: str

    @property
    def in_flight(self) -> int: ...

    async def publish(self, subject: str, body: bytes) -> None: ...

    async def settle(self, timeout_s: float) -> None: ...


class AckedPublisher:
    """Pipelined JetStream publishes: at most `window` not yet answered by a PubAck.

    Every publish carries a random Nats-Msg-Id and the reply subject of the
    current epoch; one subscription counts the answers. When nothing is
    answered for `ack_timeout_s` (a server restart lost them), the outstanding
    ones are counted as timed out and a new epoch starts, so a late answer is
    not counted twice.
    """

    def __init__(self, nc: Client, window: int = 4096, ack_timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.sent = self.settled = self.acked = self.errors = self.timeouts = self.duplicates = 0
        self.last_error = ""
        self._prefix = nc.new_inbox()
        self._epoch = 0
        self.reply = f"{self._prefix}.0"
        self._room = asyncio.Event()
        self._sub: Any = None

    @property
    def in_flight(self) -> int:
        return self.sent - self.settled

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            f"{self._prefix}.*", cb=self._on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def publish(self, subject: str, body: bytes) -> None:
        if self.sent - self.settled >= self.window:
            await self._wait_until(self.window - 1)
        try:
            await self.nc.publish(
                subject, body, reply=self.reply, headers={"Nats-Msg-Id": new_msg_id()}
            )
        except nats.errors.ConnectionClosedError:
            raise
        except nats.errors.Error as e:  # buffer full while reconnecting, ...
            self.errors += 1
            self.last_error = str(e) or type(e).__name__
            return
        self.sent += 1

    async def settle(self, timeout_s: float) -> None:
        """Wait (bounded) until every publish is answered; the rest count as timed out."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        self._give_up()

    async def _wait_until(self, most: int) -> None:
        while self.sent - self.settled > most:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), self.ack_timeout_s)
            except TimeoutError:
                self._give_up()

    def _give_up(self) -> None:
        if self.in_flight:
            self.timeouts += self.in_flight
            self.settled = self.sent
            self._epoch += 1
            self.reply = f"{self._prefix}.{self._epoch}"

    async def _on_ack(self, msg: Msg) -> None:
        if msg.subject != self.reply:
            return  # an answer from a timed-out epoch
        self.settled += 1
        data = msg.data
        if not data or b'"error"' in data:
            self.errors += 1
            self.last_error = data.decode(errors="replace")[:200] or "no responders"
        else:
            self.acked += 1
            if b'"duplicate"' in data:
                self.duplicates += 1
        self._room.set()


# ---------------------------------------------------------------- one simulated worker


_GPUS: Final = (  # model, GiB as NVML reports it
    ("NVIDIA A100-SXM4-80GB", 79.15),
    ("NVIDIA H100 80GB HBM3", 79.65),
    ("NVIDIA L40S", 44.52),
    ("NVIDIA A10G", 22.49),
)


def _hardware(capability: WorkerCapability, rng: random.Random) -> HardwareInfo:
    gpus: list[GpuInfo] = []
    if capability is not WorkerCapability.CPU:
        model, mem = rng.choice(_GPUS[:2] if capability is WorkerCapability.GPU else _GPUS[2:])
        count = rng.choice((1, 2, 4, 8) if capability is WorkerCapability.GPU else (1, 2))
        gpus = [GpuInfo(index=i, model=model, memory_gb=mem) for i in range(count)]
    cores = rng.choice((8, 16, 32, 64) if capability is WorkerCapability.CPU else (32, 64, 96))
    return HardwareInfo(
        cpu_cores=cores,
        memory_gb=round(cores * rng.choice((3.84, 7.68)), 2),
        gpu_count=len(gpus),
        gpu_memory_gb=round(sum(g.memory_gb for g in gpus), 2),
        gpu_models=[g.model for g in gpus],
        disk_space_gb=rng.choice((468.38, 937.33, 1874.66)),
        gpus=gpus,
    )


def _profiles(rng: random.Random) -> list[tuple[WorkerCapability, HardwareInfo, int]]:
    """A few dozen machine kinds, shared by the fleet: 30% gpu, 50% cpu, 20% hybrid."""
    kinds = [WorkerCapability.GPU] * 3 + [WorkerCapability.CPU] * 5 + [WorkerCapability.HYBRID] * 2
    out = []
    for capability in kinds * 4:
        hw = _hardware(capability, rng)
        slots = hw.gpu_count if capability is WorkerCapability.GPU else max(2, hw.cpu_cores // 8)
        out.append((capability, hw, slots))
    return out


class SimWorker:
    """One simulated worker: its identity, and load that wanders from beat to beat."""

    __slots__ = (
        "active",
        "avg_s",
        "capability",
        "completed",
        "cpu",
        "failed",
        "hardware",
        "idx",
        "incarnation",
        "max_tasks",
        "mem",
        "prefix",
        "state",
        "subject",
        "worker_id",
    )  # fmt: skip

    def __init__(
        self, idx: int, worker_id: str, profile: tuple[WorkerCapability, HardwareInfo, int],
        rng: random.Random,
    ) -> None:  # fmt: skip
        self.idx = idx
        self.worker_id = worker_id
        self.capability, self.hardware, self.max_tasks = profile
        self.subject = event_subject("heartbeat", worker_id)
        self.state = NEW
        self.cpu = rng.uniform(2.0, 15.0)  # idle load
        self.mem = rng.uniform(10.0, 35.0)
        self.avg_s = round(rng.lognormvariate(2.0, 0.8), 3)
        self.new_life()

    def new_life(self) -> None:
        """A new process: new incarnation, counters from zero."""
        self.incarnation = new_incarnation()
        self.prefix = _HB_PREFIX % (self.worker_id.encode(), self.incarnation.encode())
        self.active = self.completed = self.failed = 0

    def registration(self) -> WorkerRegistration:
        i = self.idx
        return WorkerRegistration(
            worker_id=self.worker_id,
            name=self.worker_id,
            capability=self.capability,
            hardware=self._probed_hardware(),
            location=WorkerLocation(
                hostname=f"{self.worker_id}.sim.internal",
                ip_address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
            ),
            max_concurrent_tasks=self.max_tasks,
            supported_content_types=list(DEFAULT_CONTENT_TYPES[self.capability]),
            tags={"simulated": "true"},
        )

    def _probed_hardware(self) -> HardwareInfo:
        """The machine kind's hardware as a probe reads it on this worker: each GPU
        with its own memory in use and utilization at that moment (the driver's
        idle share), as the real agent's registration carries them."""
        if not self.hardware.gpus:
            return self.hardware
        rng = random.Random(self.idx)
        gpus = [
            msgspec.structs.replace(
                g, memory_used_gb=round(rng.uniform(0.25, 0.6), 2),
                utilization_percent=float(rng.choice((0, 0, 0, 1, 2, 5))),
            )
            for g in self.hardware.gpus
        ]  # fmt: skip
        return msgspec.structs.replace(self.hardware, gpus=gpus)

    def register_body(self, interval_s: float) -> bytes:
        return encode(
            RegisterEvent(
                worker_id=self.worker_id, incarnation=self.incarnation, sent_at=datetime.now(UTC),
                registration=self.registration(), heartbeat_interval_s=interval_s,
            )
        )  # fmt: skip

    def unregister_body(self, reason: str) -> bytes:
        return encode(
            UnregisterEvent(
                worker_id=self.worker_id, incarnation=self.incarnation,
                sent_at=datetime.now(UTC), reason=reason,
            )
        )  # fmt: skip

    def step(self, rng: random.Random) -> None:
        """Between two beats a task may start or finish (about one beat in three)."""
        r = rng.random()
        if r >= 0.3:
            return
        if self.active and (r < 0.15 or self.active == self.max_tasks):
            self.active -= 1
            if r < 0.003:
                self.failed += 1
            else:
                self.completed += 1
        elif self.active < self.max_tasks:
            self.active += 1

    def heartbeat_body(self, sent_at: bytes, noise: float) -> bytes:
        busy = self.active / self.max_tasks
        gpu = _percent(90.0 * busy + noise) if self.hardware.gpu_count else 0.0
        gpu_mem = round(self.hardware.gpu_memory_gb * gpu / 125.0, 2)
        cpu = _percent(self.cpu + 80.0 * busy + noise)
        mem = _percent(self.mem + 50.0 * busy + noise / 2)
        avg = self.avg_s if self.completed else 0.0
        return self.prefix + sent_at + _HB_REST % (
            cpu, mem, gpu, self.active, self.completed, self.failed, avg, gpu_mem,
        )  # fmt: skip


def _percent(x: float) -> float:
    return round(min(100.0, max(0.0, x)), 1)


def sent_at_now() -> bytes:
    """`datetime.now(UTC)` as msgspec writes it inside a JSON string (no quotes)."""
    return _TIME.encode(datetime.now(UTC))[1:-1]


# ---------------------------------------------------------------- the fleet


class SimReport(msgspec.Struct, kw_only=True):
    """What one run did; printed as one line, or as JSON with --json."""

    workers: int
    heartbeat_interval_s: float
    duration_s: float = 0.0
    register: int = 0
    heartbeat: int = 0
    unregister: int = 0
    restarts: int = 0
    silent_deaths: int = 0
    kills: int = 0
    controls: int = 0
    acked: int = 0
    duplicates: int = 0
    errors: int = 0
    timeouts: int = 0
    max_lag_s: float = 0.0
    last_error: str = ""
    killed: list[str] = []

    @property
    def events(self) -> int:
        return self.register + self.heartbeat + self.unregister

    def line(self) -> str:
        rate = self.events / self.duration_s if self.duration_s else 0.0
        return (
            f"simulated {self.workers} workers for {self.duration_s:.1f} s: {self.events} events "
            f"({self.register} register, {self.heartbeat} heartbeat, {self.unregister} unregister)"
            f", {rate:.0f} events/s, {self.acked} acked, {self.errors} errors, "
            f"{self.timeouts} timed out, max schedule lag {self.max_lag_s * 1000:.0f} ms"
            + (f"; last error: {self.last_error}" if self.last_error else "")
        )


class Fleet:
    """N simulated workers driven by one schedule; `step(now)` does one tick's work."""

    def __init__(self, settings: SimSettings, publisher: Publisher) -> None:
        self.s = settings
        self.pub = publisher
        self.rng = random.Random(settings.seed)
        profiles = _profiles(self.rng)
        width = len(str(settings.count - 1))
        self.workers = [
            SimWorker(i, f"{settings.id_prefix}-{i:0{width}d}", self.rng.choice(profiles), self.rng)
            for i in range(settings.count)
        ]
        self.by_id = {w.worker_id: w for w in self.workers}
        order = list(range(settings.count))
        self.rng.shuffle(order)
        self.schedule = Schedule(order, settings.heartbeat_interval_s, 0.0)
        self.report = SimReport(
            workers=settings.count, heartbeat_interval_s=settings.heartbeat_interval_s
        )
        self._down: list[tuple[float, int]] = []  # (back at, worker index)
        self._kills: list[tuple[float, int]] = []
        self._reregister: set[int] = set()
        self._unregister_soon: list[SimWorker] = []
        self._churn_credit = 0.0
        self._last = 0.0

    # ------------------------------------------------------------ lifecycle

    async def register_all(self, now: float) -> None:
        """Register everyone (as fast as the window allows), then start the schedule."""
        for w in self.workers:
            await self.register(w)
        self.start(now)

    def start(self, now: float, in_registration_order: bool = False) -> None:
        """Start beating (and the kill clock); with a ramp, slots follow registration order."""
        if in_registration_order:
            self.schedule.order = list(range(len(self.workers)))
        self.schedule.start = self._last = now
        victims = self.rng.sample(range(len(self.workers)), min(self.s.kill, len(self.workers)))
        after, within = self.s.kill_after_s, self.s.kill_within_s
        self._kills = sorted((now + after + self.rng.uniform(0, within), i) for i in victims)

    async def step(self, now: float) -> None:
        self.report.max_lag_s = max(self.report.max_lag_s, self.schedule.lag(now))
        self._kill_due(now)
        self._churn(now)
        await self._revive_due(now)
        for i in self._take_reregister():
            await self.register(self.workers[i])
        sent_at = sent_at_now()
        rng = self.rng
        for i in self.schedule.due(now):
            w = self.workers[i]
            if w.state == ALIVE:
                w.step(rng)
                await self._send(w.subject, w.heartbeat_body(sent_at, rng.uniform(-4.0, 4.0)))
                self.report.heartbeat += 1

    async def leave(self) -> None:
        """Every live worker unregisters (the caller bounds the time)."""
        for w in self.workers:
            if w.state == ALIVE:
                await self.unregister(w, "simulation ended")
                w.state = DOWN

    # ------------------------------------------------------------ events

    async def register(self, w: SimWorker) -> None:
        w.state = ALIVE
        await self._send(
            event_subject("register", w.worker_id), w.register_body(self.s.heartbeat_interval_s)
        )
        self.report.register += 1

    async def heartbeat(self, w: SimWorker) -> None:
        """One beat now, outside the schedule (for preloading a stream)."""
        w.step(self.rng)
        await self._send(w.subject, w.heartbeat_body(sent_at_now(), self.rng.uniform(-4.0, 4.0)))
        self.report.heartbeat += 1

    async def unregister(self, w: SimWorker, reason: str) -> None:
        await self._send(event_subject("unregister", w.worker_id), w.unregister_body(reason))
        self.report.unregister += 1

    async def _send(self, subject: str, body: bytes) -> None:
        await self.pub.publish(subject, body)

    # ------------------------------------------------------------ churn, deaths, control

    def _churn(self, now: float) -> None:
        dt, self._last = now - self._last, now
        if not self.s.churn:
            return
        self._churn_credit += self.s.churn / 60.0 * len(self.workers) * max(dt, 0.0)
        while self._churn_credit >= 1.0:
            self._churn_credit -= 1.0
            w = self.workers[self.rng.randrange(len(self.workers))]
            if w.state != ALIVE:
                continue
            w.state = DOWN
            if self.rng.random() < 0.5:
                self._restart(w, now)
            else:
                self._die_silently(w, now)

    def _restart(self, w: SimWorker, now: float) -> None:
        """Unregister now; back as a new incarnation within one interval."""
        self._reregister.discard(w.idx)
        self._unregister_soon.append(w)
        back = now + self.rng.uniform(0.1, 1.0) * self.s.heartbeat_interval_s
        heapq.heappush(self._down, (back, w.idx))
        self.report.restarts += 1

    def _die_silently(self, w: SimWorker, now: float) -> None:
        """Stop beating; back (new incarnation) after long enough to be expired."""
        away = max(4.0 * self.s.heartbeat_interval_s, 2.0) * self.rng.uniform(1.0, 1.5)
        heapq.heappush(self._down, (now + away, w.idx))
        self.report.silent_deaths += 1

    def _kill_due(self, now: float) -> None:
        while self._kills and self._kills[0][0] <= now:
            _, i = self._kills.pop(0)
            w = self.workers[i]
            if w.state == NEW:  # not registered yet: kill it one interval later
                bisect.insort(self._kills, (now + self.s.heartbeat_interval_s, i))
                continue
            w.state = DEAD
            self.report.kills += 1
            self.report.killed.append(w.worker_id)

    async def _revive_due(self, now: float) -> None:
        for w in self._unregister_soon:
            await self.unregister(w, "restart")
        self._unregister_soon.clear()
        while self._down and self._down[0][0] <= now:
            _, i = heapq.heappop(self._down)
            w = self.workers[i]
            if w.state != DOWN:
                continue
            w.new_life()
            w.state = ALIVE
            await self.register(w)

    def on_control(self, worker_id: str, data: bytes) -> None:
        """`{action: register}` on worker.control.<id>: register again (same incarnation)."""
        w = self.by_id.get(worker_id)
        if w is None or w.state != ALIVE:
            return
        try:
            control = CONTROL_DECODER.decode(data)
        except msgspec.DecodeError:
            return
        if control.action == "register":
            self._reregister.add(w.idx)
            self.report.controls += 1

    def _take_reregister(self) -> list[int]:
        out = [i for i in self._reregister if self.workers[i].state == ALIVE]
        self._reregister.clear()
        return out

    def finish(self, duration_s: float) -> SimReport:
        r, p = self.report, self.pub
        r.duration_s = round(duration_s, 3)
        r.acked, r.errors, r.timeouts, r.duplicates = p.acked, p.errors, p.timeouts, p.duplicates
        r.last_error = p.last_error
        r.max_lag_s = round(r.max_lag_s, 4)
        return r


# ---------------------------------------------------------------- running it


async def connect(url: str, timeout_s: float = 10.0) -> Client:
    """Connect (retrying for up to `timeout_s`), then reconnect by ourselves forever."""

    async def on_error(e: Exception) -> None:
        log.warning("nats_error", url=url, error=str(e) or type(e).__name__)

    return await asyncio.wait_for(
        nats.connect(
            servers=[u.strip() for u in url.split(",") if u.strip()], name="agent-simulate",
            connect_timeout=2.0, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            pending_size=32 * 1024 * 1024, error_cb=on_error,
        ),
        timeout_s,
    )  # fmt: skip


async def _connect_unless_stopped(url: str, stop: asyncio.Event) -> Client | None:
    """Connect, or give up quietly (None) when stopped while still connecting."""
    connecting = asyncio.ensure_future(connect(url))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    try:
        nc = await connecting
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise  # we were cancelled ourselves, not just the connection attempt
        return None
    except (OSError, TimeoutError, nats.errors.Error):
        return None
    await nc.close()  # it connected just as we were told to stop
    return None


async def simulate(
    settings: SimSettings, stop: asyncio.Event, hurry: asyncio.Event | None = None
) -> SimReport:
    """Run the fleet until `stop` (or --duration); then unregister, bounded. `hurry` skips that."""
    hurry = hurry or asyncio.Event()
    loop = asyncio.get_running_loop()
    nc = await _connect_unless_stopped(settings.nats_url, stop)
    if nc is None:
        return SimReport(workers=settings.count, heartbeat_interval_s=settings.heartbeat_interval_s)
    t0 = loop.time()
    publisher = AckedPublisher(nc, settings.window)
    fleet = Fleet(settings, publisher)
    try:
        await publisher.start()

        async def on_control(msg: Msg) -> None:
            fleet.on_control(msg.subject.rpartition(".")[2], msg.data)

        await nc.subscribe("worker.control.*", cb=on_control)
        await _run(fleet, settings, stop, loop)
        if settings.unregister and not hurry.is_set():
            await _leave(fleet, settings, hurry)
        await fleet.pub.settle(0.5 if hurry.is_set() else settings.stop_timeout_s / 2)
    finally:
        report = fleet.finish(loop.time() - t0)
        try:
            await asyncio.wait_for(nc.drain(), 2.0)
        except (TimeoutError, nats.errors.Error):
            await nc.close()
    return report


async def _run(
    fleet: Fleet, s: SimSettings, stop: asyncio.Event, loop: asyncio.AbstractEventLoop
) -> None:
    """Register (at once, or evenly over --ramp while the registered beat), then beat."""
    start = loop.time()
    end = start + s.duration_s if s.duration_s else float("inf")
    n, registered = len(fleet.workers), 0
    if s.ramp_s:
        fleet.start(start, in_registration_order=True)  # first beat one interval after its register
    next_log, last_events = start + 10.0, 0
    while not stop.is_set() and (now := loop.time()) < end:
        if registered < n:
            due = n if not s.ramp_s else min(n, int((now - start) / s.ramp_s * n) + 1)
            for w in fleet.workers[registered:due]:
                if stop.is_set():
                    return
                await fleet.register(w)
            registered = due
            if registered == n:
                log.info("simulate_registered", workers=n, seconds=round(loop.time() - start, 2))
                if not s.ramp_s:
                    fleet.start(loop.time())
                continue
        await fleet.step(now)
        if now >= next_log:
            events = fleet.report.events
            log.info("simulate_progress", events=events, rate=round((events - last_events) / 10.0),
                     in_flight=fleet.pub.in_flight, lag_ms=round(fleet.schedule.lag(now) * 1000),
                     errors=fleet.pub.errors)  # fmt: skip
            next_log, last_events = now + 10.0, events
        delay = min(s.tick_s - (loop.time() - now), end - loop.time())
        await asyncio.sleep(max(delay, 0.0))


async def _leave(fleet: Fleet, s: SimSettings, hurry: asyncio.Event) -> None:
    """Unregister every live worker, within half the stop timeout."""

    async def leave() -> None:
        for w in fleet.workers:
            if hurry.is_set():
                return
            if w.state == ALIVE:
                await fleet.unregister(w, "simulation ended")
                w.state = DOWN

    try:
        await asyncio.wait_for(leave(), s.stop_timeout_s / 2)
    except TimeoutError:
        log.warning("simulate_unregister_incomplete", timeout_s=s.stop_timeout_s / 2)


async def run_until_signal(settings: SimSettings) -> SimReport:
    """`simulate` until SIGINT/SIGTERM; a second signal skips the unregistering."""
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        return await simulate(settings, stop, hurry)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


# ---------------------------------------------------------------- command line

# settings field -> (flag, environment variable)
OPTIONS: Final = {
    "nats_url": ("--nats", "NATS_URL"),
    "count": ("--count", "SIM_COUNT"),
    "heartbeat_interval_s": ("--heartbeat-interval", "SIM_HEARTBEAT_INTERVAL"),
    "churn": ("--churn", "SIM_CHURN"),
    "duration_s": ("--duration", "SIM_DURATION"),
    "seed": ("--seed", "SIM_SEED"),
    "id_prefix": ("--id-prefix", "SIM_ID_PREFIX"),
    "ramp_s": ("--ramp", "SIM_RAMP"),
    "kill": ("--kill", "SIM_KILL"),
    "kill_after_s": ("--kill-after", "SIM_KILL_AFTER"),
    "kill_within_s": ("--kill-within", "SIM_KILL_WITHIN"),
    "window": ("--window", "SIM_WINDOW"),
}
_HELP: Final = {
    "nats_url": "NATS server URL(s), comma-separated (default nats://127.0.0.1:4222)",
    "count": "number of simulated workers (default 200)",
    "heartbeat_interval_s": "seconds between a worker's heartbeats (default 5)",
    "churn": "fraction of the fleet per minute that restarts or dies silently (default 0)",
    "duration_s": "stop after this many seconds (default: until SIGINT/SIGTERM)",
    "seed": "seed for the fleet's make-up and behaviour (default: random)",
    "id_prefix": "worker ids are PREFIX-<n> (default sim)",
    "ramp_s": "spread the registrations over this many seconds (default 0: at once)",
    "kill": "this many workers die silently for good, at random moments (default 0)",
    "kill_after_s": "the kills start this many seconds after registering (default 0)",
    "kill_within_s": "...and are spread over this many seconds (default 10)",
    "window": "most publishes awaiting their PubAck (default 4096)",
}
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class UsageError(Exception):
    """Bad command-line input; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def add_arguments(p: argparse.ArgumentParser) -> None:
    for field, (flag, env) in OPTIONS.items():
        p.add_argument(flag, dest=field, help=f"{_HELP[field]} (env {env})")
    p.add_argument(
        "--no-unregister",
        action="store_true",
        help="leave without unregistering (the registry expires the fleet)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="(env LOG_LEVEL, default info)")


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> SimSettings:
    """Flags, else environment variables, validated; UsageError names the flag."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field, (_, var) in OPTIONS.items():
        value = getattr(args, field, None)
        if value is None:
            value = env.get(var) or None
        if value is not None:
            raw[field] = value
    raw["unregister"] = not getattr(args, "no_unregister", False)
    try:
        return SimSettings.model_validate(raw)
    except ValidationError as e:
        raise UsageError(_describe(e)) from None


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    flag, _ = OPTIONS.get(field, (field, ""))
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid {flag} {first.get('input')!r}: {message}"


def run_command(args: argparse.Namespace) -> int:
    """Run from parsed arguments: 0 after a clean stop, 1 if NATS fails, 2 on bad input."""
    try:
        settings = settings_from(args)
    except UsageError as e:
        print(f"agent simulate: {e}", file=sys.stderr)
        return 2
    logs.configure(args.log_level or os.environ.get("LOG_LEVEL") or "info")
    try:
        report = asyncio.run(run_until_signal(settings))
    except (OSError, TimeoutError, nats.errors.Error) as e:
        why = "not reachable within 10 s" if isinstance(e, TimeoutError) else str(e)
        print(f"agent simulate: cannot use NATS at {settings.nats_url}: {why}", file=sys.stderr)
        return 1
    print(encode(report).decode() if args.json else report.line(), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="agent simulate", description="Run a fleet of simulated workers.")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"agent simulate: {e}", file=sys.stderr)
        return 2
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
