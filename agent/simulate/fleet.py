"""The fleet: N simulated workers driven by one schedule, and what a run did.

`Fleet.step(now)` does one tick's work: the beats that came due, churn, kills,
and registrations asked for on `worker.control.<id>`. Churn R is the fraction
of the fleet per minute that either restarts (unregisters, registers again
shortly after as a new incarnation) or dies silently (stops beating, and after
a while comes back as a new incarnation). `--kill N` makes N workers die
silently, for good, at random moments.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import random

import msgspec

from agent.simulate.publisher import Publisher
from agent.simulate.schedule import Schedule
from agent.simulate.settings import SimSettings
from agent.simulate.wire import sent_at_now
from agent.simulate.worker import ALIVE, DEAD, DOWN, NEW, SimWorker, profiles
from registry.protocol import CONTROL_DECODER, event_subject


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
    retried: int = 0  # sends again after "no stream answered" (same Nats-Msg-Id)
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
            f"{self.retried} sent again, "
            f"{self.timeouts} timed out, max schedule lag {self.max_lag_s * 1000:.0f} ms"
            + (f"; last error: {self.last_error}" if self.last_error else "")
        )


class Fleet:
    """N simulated workers driven by one schedule; `step(now)` does one tick's work."""

    def __init__(self, settings: SimSettings, publisher: Publisher) -> None:
        self.s = settings
        self.pub = publisher
        self.rng = random.Random(settings.seed)
        kinds = profiles(self.rng)
        width = len(str(settings.count - 1))
        self.workers = [
            SimWorker(i, f"{settings.id_prefix}-{i:0{width}d}", self.rng.choice(kinds), self.rng)
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

    async def leave(self, hurry: asyncio.Event | None = None) -> None:
        """Every live worker unregisters, unless `hurry` is set (the caller bounds the time)."""
        for w in self.workers:
            if hurry is not None and hurry.is_set():
                return
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
        r.retried = p.retried
        r.last_error = p.last_error
        r.max_lag_s = round(r.max_lag_s, 4)
        return r
