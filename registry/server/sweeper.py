"""Clock + sweep.py -> `worker.late.<id>` / `worker.expired.<id>` events. Never writes the bucket.

Deadlines live in heaps and the sweeper sleeps until the earliest one, so a
silent worker is judged within milliseconds of its deadline, not on a polling
tick. It judges nobody until the projector has caught up, and grants one
timeout of grace (from the moment it starts judging) to workers it has not
seen beat since, so a registry restart never kills healthy workers. After an
outage (the stream did not answer, the connection came back) the grace is at
least `outage_grace_s`: every worker has to reconnect and retry, not just beat.

A worker more than `late_factor` intervals behind is announced late
(unavailable) first; its next heartbeat makes it available again. When more
than `brake_fraction` of the fleet would expire at once, expiries are held and
the registry says so loudly: it suspects itself before it declares a fleet dead.
The hold is bounded: after `brake_hold_timeouts` timeouts (or `brake_hold_s`) the
held expiries are released at `brake_release_per_s`, oldest silence first, as
Kubernetes' node lifecycle controller evicts at a limited rate from an unhealthy
zone; a worker that beats again meanwhile is not expired; an operator who knows
the workers are gone releases them at once (`registry brake release`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial

import structlog
from nats.js import api

from registry.cancel import raise_if_cancelled
from registry.protocol import (
    ExpiredEvent,
    LateEvent,
    WorkerInfo,
    encode,
    event_subject,
)
from registry.server.link import Link
from registry.server.pipeline import Pipeline
from registry.server.settings import RegistrySettings
from registry.sweep import DeadlineHeap, Due, ServerClock, brake_engaged, deadline, timeout_s

log = structlog.get_logger("registry.sweeper")

MAX_SLEEP_S = 1.0
PUBLISH_TIMEOUT_S = 5.0
HOLD_RECHECK_S = 1.0
HOLD_LOG_EVERY_S = 5.0
REJUDGE_AFTER_S = 0.25


class Sweeper:
    def __init__(
        self,
        link: Link,
        settings: RegistrySettings,
        clock: ServerClock,
        records: Callable[[], Mapping[str, WorkerInfo]],
        on_detected: Callable[[float], None] = lambda latency_s: None,
    ) -> None:
        self.link = link
        self.settings = settings
        self.clock = clock
        self.records = records
        self.heap = DeadlineHeap()
        self.late_heap = DeadlineHeap()
        self.judging_in: int | None = None  # the epoch whose grace the heaps were built with
        self.expiries_published = 0
        self.lates_published = 0
        self.brake_engaged = False
        self.held_since: float | None = None  # server time the current hold began
        self.hold_s = 0.0  # how long this hold lasts before expiries are released
        self.expiries_released = 0  # let through at the limited rate after a hold
        self.operator_releases = 0
        self._released_until = 0.0  # an operator's release: no brake until then
        self._tokens = 0.0  # the release rate's bucket
        self._tokens_at = 0.0
        self.on_detected = on_detected  # seconds from a worker's deadline to its expiry stored
        self._recent: deque[float] = deque()
        self._held: set[str] = set()  # workers whose expiry the brake holds now
        self._silent: dict[str, float] = {}  # past their late deadline: id -> judged heartbeat
        self._last_hold_log = 0.0
        self._wake = asyncio.Event()
        self._attempts: dict[tuple[str, str, int], int] = {}  # verdicts sent again
        self.pipeline = Pipeline(link)

    @property
    def started(self) -> bool:
        """Judging: the heaps hold every live worker's deadlines."""
        return self.judging_in is not None

    @property
    def expiries_held(self) -> int:
        """Workers whose expiry the brake holds now."""
        return len(self._held)

    def timeout_of(self, record: WorkerInfo) -> float:
        s = self.settings
        return timeout_s(record.heartbeat_interval_s, s.timeout_floor_s, s.timeout_factor)

    def late_after(self, record: WorkerInfo) -> float | None:
        factor = self.settings.late_factor
        return factor * record.heartbeat_interval_s if factor > 0 else None

    # ------------------------------------------------------------ fed by the projector

    def observe(self, record: WorkerInfo) -> None:
        """A record was written: (re)arm or drop its deadlines."""
        if self.started:  # before, the heaps are built from all records when judging starts
            self._arm(record, grace_until=0.0)
            self._wake.set()

    def rejudge(self, record: WorkerInfo, late: bool) -> None:
        """The fold refused a verdict as premature: judge this worker again.

        Ours is refused when the clock estimate ran ahead of the server's stored
        time; its deadline was popped, so without this a dead worker would stay
        live. A deadline still pending is left alone (a forged premature verdict
        must not postpone it), so only a judged worker is re-armed, no sooner than
        REJUDGE_AFTER_S from now."""
        wid, last = record.worker_id, record.last_heartbeat.timestamp()
        heap = self.late_heap if late else self.heap
        span = self.late_after(record) if late else self.timeout_of(record)
        if not self.started or not record.live or span is None or heap.pending(wid) == last:
            return
        if late and self._silent.pop(wid, None) != last:
            return  # not judged late by us: nothing to judge again
        self._next_attempt("late" if late else "expired", record)  # the id was used
        at = max(last + span, self._now() + REJUDGE_AFTER_S)
        heap.set(wid, last, at)
        self._wake.set()
        log.info("verdict_refused_rejudging", worker_id=wid, kind="late" if late else "expired",
                 at=datetime.fromtimestamp(at, UTC).isoformat())  # fmt: skip

    def forget(self, worker_id: str) -> None:
        """The worker's record was purged (after retention): nothing of it stays here."""
        self.heap.discard(worker_id)
        self.late_heap.discard(worker_id)
        self._silent.pop(worker_id, None)
        self._held.discard(worker_id)

    def reset(self, records: Mapping[str, WorkerInfo]) -> None:
        """The projector reloaded the bucket: judge nobody until caught up again."""
        self.judging_in = None
        self.heap = DeadlineHeap()
        self.late_heap = DeadlineHeap()

    def _arm(self, record: WorkerInfo, grace_until: float, grace_s: float = 0.0) -> None:
        """(Re)arm a live worker's deadlines; `grace_until` > 0: none ends before
        max(its span, `grace_s`) from then."""
        wid = record.worker_id
        last = record.last_heartbeat.timestamp()
        self._held.discard(wid)  # judged afresh from this record
        if self._silent.get(wid, last) != last or not record.live:
            self._silent.pop(wid, None)
        if not record.live:
            self.heap.discard(wid)
            self.late_heap.discard(wid)
            return
        timeout = self.timeout_of(record)
        grace = _grace(grace_until, max(timeout, grace_s))
        self.heap.set(wid, last, deadline(last, timeout, grace))
        late = self.late_after(record)
        if late is None or wid in self._silent:
            self.late_heap.discard(wid)
        else:
            grace = _grace(grace_until, max(late, grace_s))
            self.late_heap.set(wid, last, deadline(last, late, grace))

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        await self.pipeline.start()
        try:
            await self._loop()
        finally:
            with contextlib.suppress(Exception):
                await self.pipeline.stop()

    async def _loop(self) -> None:
        """Judge while the projector is caught up in the current epoch. A lost connection
        (nobody could beat meanwhile) or a reload starts over: wait for the backlog to be
        folded, then grant grace again."""
        while True:
            raise_if_cancelled()
            if self.judging_in is not None and self.link.reconnected_since(self.judging_in):
                log.info("sweeper_paused_after_reconnect")
                self.reset({})
            epoch = await self.link.wait_caught_up()
            if self.judging_in != epoch:
                self._start_grace(epoch)
            await self._sleep_until_due()
            if self.link.is_caught_up and self.link.epoch == epoch == self.judging_in:
                await self._judge()

    def _start_grace(self, epoch: int) -> None:
        now = self.clock.now(time.monotonic())
        outage = self.link.take_trouble()
        grace_s = self.settings.outage_grace_s if outage else 0.0
        self.judging_in = epoch
        self.heap = DeadlineHeap()
        self.late_heap = DeadlineHeap()
        self._silent.clear()
        self._held.clear()
        # a hold of before the outage or the term: judged afresh (an operator's release stays)
        self.brake_engaged, self.held_since = False, None
        for record in self.records().values():
            self._arm(record, grace_until=now, grace_s=grace_s)
        log.info("sweeper_started", workers=len(self.heap), server_time=now,
                 after_outage=outage, grace_s=grace_s or "one timeout")  # fmt: skip

    async def _sleep_until_due(self) -> None:
        self._wake.clear()
        dues = [at for at in (self.heap.next_at(), self.late_heap.next_at()) if at is not None]
        mono = time.monotonic()
        delay = self.clock.mono_at(min(dues), mono) - mono if dues else MAX_SLEEP_S
        if delay > 0:
            try:  # not wait_for: on 3.11 it can swallow a cancel that races the wake-up
                async with asyncio.timeout(min(delay, MAX_SLEEP_S)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _judge(self) -> None:
        """Everyone due now, decided together and published in one pipelined flush."""
        now = self.clock.now(time.monotonic())
        events: list[tuple[LateEvent | ExpiredEvent, WorkerInfo]] = []
        for due in self._still_due(self.late_heap.pop_due(now)):
            self._silent[due.worker_id] = due.last_heartbeat
            record = self.records()[due.worker_id]
            if record.available:  # a late notice only matters to routers
                events.append((self._late_event(record, now), record))
        overdue = self._still_due(self.heap.pop_due(now))
        if overdue or self.brake_engaged:
            overdue = self._brake(overdue, now)
        events += [(self._expired_event(self.records()[d.worker_id], now),
                    self.records()[d.worker_id]) for d in overdue]  # fmt: skip
        if events:
            await self._publish(events)

    def _still_due(self, dues: list[Due]) -> list[Due]:
        """Drop workers that went offline or beat since (their deadline is re-armed)."""
        records = self.records()
        kept = []
        for due in dues:
            record = records.get(due.worker_id)
            if record is None or not record.live:
                self._held.discard(due.worker_id)
                continue
            if record.last_heartbeat.timestamp() != due.last_heartbeat:
                self._arm(record, grace_until=0.0)
                continue
            kept.append(due)
        return kept

    def _brake(self, overdue: list[Due], now: float) -> list[Due]:
        """The mass-expiry brake: which of these expiries go out now. When too much of
        the fleet dies at once, none for the hold, then a limited rate; the rest are
        judged again shortly (unless they beat meanwhile)."""
        s = self.settings
        while self._recent and self._recent[0] < now - s.brake_window_s:
            self._recent.popleft()
        live = len(self.heap) + len(overdue)
        silent = len(self._silent) + sum(d.worker_id not in self._silent for d in overdue)
        engaged = now >= self._released_until and brake_engaged(
            silent, live, len(self._recent), s.brake_fraction, s.brake_min_fleet
        )
        if not engaged:
            if self.brake_engaged:
                log.warning("mass_expiry_released", overdue=len(overdue), silent=silent,
                            live=live, by_operator=now < self._released_until)  # fmt: skip
            self.brake_engaged, self.held_since = False, None
            self._held.clear()
            return overdue
        if self.held_since is None:
            self.held_since, self.hold_s = now, self._hold_span(overdue)
            self._tokens, self._tokens_at = 1.0, now + self.hold_s  # one at the hold's end
        self.brake_engaged = True
        let: list[Due] = []
        if now >= self.held_since + self.hold_s:  # the hold is over: a limited rate
            rate = self.release_rate(live + len(self._recent))
            self._tokens = min(max(rate, 1.0), self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            overdue.sort(key=lambda d: d.last_heartbeat)  # the longest silent first
            let = overdue[: int(self._tokens)]
            self._tokens -= len(let)
            self.expiries_released += len(let)
            overdue = overdue[len(let) :]
            again = now + min(HOLD_RECHECK_S, 1.0 / rate)
        else:
            again = min(now + HOLD_RECHECK_S, self.held_since + self.hold_s)
        for due in overdue:  # judged again shortly, unless they beat meanwhile
            self.heap.set(due.worker_id, due.last_heartbeat, again)
            self._held.add(due.worker_id)
        self._held.difference_update(d.worker_id for d in let)
        if time.monotonic() - self._last_hold_log > HOLD_LOG_EVERY_S or let and not overdue:
            self._last_hold_log = time.monotonic()
            log.error("mass_expiry_held" if not let else "mass_expiry_releasing",
                      held=len(self._held), released_now=len(let), silent=silent, live=live,
                      recently_expired=len(self._recent), fraction=s.brake_fraction,
                      held_for_s=round(now - self.held_since, 1), hold_s=round(self.hold_s, 1),
                      release_per_s=self.release_rate(live + len(self._recent)))  # fmt: skip
        return let

    def _hold_span(self, overdue: list[Due]) -> float:
        s = self.settings
        if s.brake_hold_s is not None:
            return s.brake_hold_s
        records = self.records()
        longest = max((self.timeout_of(records[d.worker_id]) for d in overdue
                       if d.worker_id in records), default=s.timeout_floor_s)  # fmt: skip
        return s.brake_hold_timeouts * longest

    def release_rate(self, fleet: int) -> float:
        """Expiries per second once a hold is over."""
        rate = self.settings.brake_release_per_s
        return rate if rate is not None else max(1.0, 0.01 * fleet)

    def release(self) -> int:
        """An operator says the silent workers are gone: expire every held one now, and
        do not brake again for a brake window. Returns how many were held."""
        now = self._now()
        held = self.expiries_held  # none unless engaged
        self._released_until = now + max(self.settings.brake_window_s, self.hold_s)
        self.operator_releases += 1
        self._wake.set()  # the held are judged again within HOLD_RECHECK_S, unbraked
        return held

    def brake(self) -> dict[str, object]:
        """The brake's state, for `registry brake status` and `registry check`."""
        now = self._now()
        phase = "off"
        if self.brake_engaged and self.held_since is not None:
            phase = "holding" if now < self.held_since + self.hold_s else "releasing"
        fleet = len(self.heap) + len(self._recent)
        return {
            "phase": phase, "engaged": self.brake_engaged, "held": self.expiries_held,
            "held_since": self.held_since, "hold_s": self.hold_s if self.held_since else None,
            "release_per_s": self.release_rate(fleet), "expiries_released": self.expiries_released,
            "operator_released_until": self._released_until if now < self._released_until else None,
            "operator_releases": self.operator_releases,
        }  # fmt: skip

    # ------------------------------------------------------------ events

    def _expired_event(self, record: WorkerInfo, now: float) -> ExpiredEvent:
        return ExpiredEvent(
            worker_id=record.worker_id, last_heartbeat=record.last_heartbeat,
            timeout_s=self.timeout_of(record), detected_at=datetime.fromtimestamp(now, UTC),
        )  # fmt: skip

    def _late_event(self, record: WorkerInfo, now: float) -> LateEvent:
        return LateEvent(
            worker_id=record.worker_id, last_heartbeat=record.last_heartbeat,
            late_after_s=self.late_after(record) or 0.0,
            detected_at=datetime.fromtimestamp(now, UTC),
        )  # fmt: skip

    async def _publish(self, events: list[tuple[LateEvent | ExpiredEvent, WorkerInfo]]) -> None:
        for event, record in events:
            kind = _kind(event)
            headers = {api.Header.MSG_ID.value: self._msg_id(kind, record)}
            subject = event_subject(kind, record.worker_id)
            await self.pipeline.publish(
                subject, encode(event), headers, partial(self._count, event),
                partial(self._duplicate, event, record),
            )  # fmt: skip
        try:
            await self.pipeline.flush(PUBLISH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - an outage: judged again after it, with grace
            # No verdict could be stored, so no heartbeat could either (a leader election,
            # a lost connection): sending the verdicts again when the stream answers
            # could store them before the heartbeats the workers are retrying. Judge
            # nobody until the projector has folded what the stream holds then, and
            # grant everyone a timeout from that moment, as after a restart.
            log.warning("sweep_publish_failed", events=len(events), error=str(e),
                        hint="judging again after the projector catches up, with grace")  # fmt: skip
            self.link.trouble()
            self.link.fell_behind()
            self.reset({})

    def _msg_id(self, kind: str, record: WorkerInfo) -> str:
        """The same verdict on the same heartbeat has the same Nats-Msg-Id in every
        registry process, so two active at once (a short overlap) store it once. A
        verdict judged again after the fold refused it as premature needs another."""
        key = (kind, record.worker_id, record.last_heartbeat_seq)
        again = self._attempts.get(key, 0)
        return f"{record.worker_id}.{kind}.{record.last_heartbeat_seq}" + (f".{again}" if again else "")

    def _next_attempt(self, kind: str, record: WorkerInfo) -> None:
        if len(self._attempts) > 100_000:
            self._attempts.clear()
        key = (kind, record.worker_id, record.last_heartbeat_seq)
        self._attempts[key] = self._attempts.get(key, 0) + 1

    def _duplicate(self, event: LateEvent | ExpiredEvent, record: WorkerInfo, seq: int) -> None:
        """The stream already held this verdict (another registry's, or ours refused as
        premature): look again shortly, under a new id. If it was applied, the worker is
        no longer due by then and nothing more is sent."""
        self._next_attempt(_kind(event), record)
        heap = self.heap if isinstance(event, ExpiredEvent) else self.late_heap
        if isinstance(event, LateEvent):
            self._silent.pop(record.worker_id, None)
        heap.set(record.worker_id, record.last_heartbeat.timestamp(), self._now() + REJUDGE_AFTER_S)
        self._wake.set()
        log.info("verdict_already_stored", worker_id=record.worker_id, kind=_kind(event), seq=seq)

    def _count(self, event: LateEvent | ExpiredEvent, seq: int) -> None:
        if isinstance(event, ExpiredEvent):
            self.expiries_published += 1
            now = self._now()
            self._recent.append(now)
            deadline_s = event.last_heartbeat.timestamp() + event.timeout_s
            self.on_detected(max(0.0, now - deadline_s))
        else:
            self.lates_published += 1
        log.info(f"worker_{_kind(event)}", worker_id=event.worker_id, seq=seq,
                 last_heartbeat=event.last_heartbeat.isoformat())  # fmt: skip

    def _now(self) -> float:
        return self.clock.now(time.monotonic())


def _kind(event: LateEvent | ExpiredEvent) -> str:
    return "expired" if isinstance(event, ExpiredEvent) else "late"


def _grace(started_at: float, span: float) -> float:
    """Workers not seen beat since judging started get one `span` from then (0: none)."""
    return started_at + span if started_at else 0.0
