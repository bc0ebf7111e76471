"""Clock + sweep.py -> `worker.expired.<id>` events. Never writes the bucket.

Deadlines live in a heap and the sweeper sleeps until the earliest one, so a
silent worker is judged within milliseconds of its timeout, not on a polling
tick. It judges nobody until the projector has caught up, and grants one
timeout of grace (from the moment it starts judging) to workers it has not
seen beat since, so a registry restart never kills healthy workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import structlog
from nats.aio.client import Client
from nats.js import api

from registry.projector import raise_if_cancelled
from registry.protocol import ExpiredEvent, WorkerInfo, encode, event_subject, new_msg_id
from registry.settings import RegistrySettings
from registry.sweep import DeadlineHeap, ServerClock, deadline, timeout_s

log = structlog.get_logger("registry.sweeper")

MAX_SLEEP_S = 1.0


class Sweeper:
    def __init__(
        self,
        nc: Client,
        settings: RegistrySettings,
        clock: ServerClock,
        records: Callable[[], Mapping[str, WorkerInfo]],
        caught_up: asyncio.Event,
    ) -> None:
        self.js = nc.jetstream()
        self.settings = settings
        self.clock = clock
        self.records = records
        self.caught_up = caught_up
        self.heap = DeadlineHeap()
        self.started = False
        self.expiries_published = 0
        self._wake = asyncio.Event()

    def timeout_of(self, record: WorkerInfo) -> float:
        s = self.settings
        return timeout_s(record.heartbeat_interval_s, s.timeout_floor_s, s.timeout_factor)

    # ------------------------------------------------------------ fed by the projector

    def observe(self, record: WorkerInfo) -> None:
        """A record was written: (re)arm or drop its deadline."""
        if not self.started:
            return  # the heap is built from all records when judging starts
        if not record.live:
            self.heap.discard(record.worker_id)
            return
        last = record.last_heartbeat.timestamp()
        self.heap.set(record.worker_id, last, last + self.timeout_of(record))
        self._wake.set()

    def reset(self, records: Mapping[str, WorkerInfo]) -> None:
        """The projector reloaded the bucket: judge nobody until caught up again."""
        self.started = False
        self.heap = DeadlineHeap()

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        while True:
            raise_if_cancelled()
            await self.caught_up.wait()
            if not self.started:
                self._start_grace()
            await self._sleep_until_due()
            if self.caught_up.is_set():
                await self._expire_due()

    def _start_grace(self) -> None:
        now = self.clock.now(time.monotonic())
        self.started = True
        self.heap = DeadlineHeap()
        for record in self.records().values():
            if record.live:
                last = record.last_heartbeat.timestamp()
                timeout = self.timeout_of(record)
                at = deadline(last, timeout, now + timeout)
                self.heap.set(record.worker_id, last, at)
        log.info("sweeper_started", workers=len(self.heap), server_time=now)

    async def _sleep_until_due(self) -> None:
        self._wake.clear()
        at = self.heap.next_at()
        mono = time.monotonic()
        delay = MAX_SLEEP_S if at is None else self.clock.mono_at(at, mono) - mono
        if delay > 0:
            try:  # not wait_for: on 3.11 it can swallow a cancel that races the wake-up
                async with asyncio.timeout(min(delay, MAX_SLEEP_S)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _expire_due(self) -> None:
        now = self.clock.now(time.monotonic())
        records = self.records()
        for due in self.heap.pop_due(now):
            record = records.get(due.worker_id)
            if record is None or not record.live:
                continue
            if record.last_heartbeat.timestamp() != due.last_heartbeat:
                self.observe(record)
                continue
            await self._publish(record, now)

    async def _publish(self, record: WorkerInfo, now: float) -> None:
        timeout = self.timeout_of(record)
        event = ExpiredEvent(
            worker_id=record.worker_id,
            last_heartbeat=record.last_heartbeat,
            timeout_s=timeout,
            detected_at=datetime.fromtimestamp(now, UTC),
        )
        headers = {api.Header.MSG_ID: new_msg_id()}
        try:
            await self.js.publish(
                event_subject("expired", record.worker_id), encode(event), headers=headers
            )
        except Exception as e:  # noqa: BLE001 - judged again after a short pause
            log.warning("expiry_publish_failed", worker_id=record.worker_id, error=str(e))
            self.heap.set(record.worker_id, record.last_heartbeat.timestamp(), now + 0.5)
            return
        self.expiries_published += 1
        log.info(
            "worker_expired", worker_id=record.worker_id, timeout_s=timeout,
            last_heartbeat=record.last_heartbeat.isoformat(),
        )  # fmt: skip
