"""The gateway's NATS side: HTTP calls in, the same events an agent publishes out.

Stateless in what matters: every write is an event in WORKER_EVENTS (published
as an agent publishes it: one Nats-Msg-Id, retried under it), every read comes
from the bucket, followed live (registry.server.follower). The incarnation an
HTTP worker's events carry is the one its record holds, so any gateway behind a
load balancer can take its next heartbeat; the one that registered it also
remembers it, so the first heartbeat need not wait for the fold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client

from agent.publish import publish_event
from registry import protocol
from registry.eventlog import EventLogError, EventQuery, read_events
from registry.http.models import Change, Explanation, Health, History, HistoryEvent
from registry.ops.explain import replay, verdict
from registry.protocol import (
    HeartbeatEvent,
    OfflineReason,
    RegisterEvent,
    UnregisterEvent,
    WorkerInfo,
    WorkerMetrics,
    WorkerRegistration,
    WorkerStatus,
)
from registry.query import Stats
from registry.server.follower import Follower

log = structlog.get_logger("registry.http")

PUBLISH_ATTEMPT_S = 2.0
PUBLISH_BUDGET_S = 5.0  # a stream leader election takes 4-7 s: then 503, and the client retries
SEEN_WITHIN_S = 2.0  # a (un)registration is answered once the bucket shows it, or after this
STATS_TIMEOUT_S = 1.0
LAGGING_S = 5.0  # the projector further behind than this: health "degraded"
FEED_QUEUE = 10_000  # changes a live-feed client may fall behind by before it is cut off
MAX_HISTORY = 1000


class NotFound(LookupError):
    """No such worker (or none that may beat: it unregistered)."""


class Unavailable(RuntimeError):
    """NATS did not store the event in time; nothing was changed. Retry."""


@dataclass(frozen=True)
class GatewaySettings:
    heartbeat_interval_s: float = 30.0  # the original plan's client beats every 30 s
    publish_budget_s: float = PUBLISH_BUDGET_S


class Gateway:
    def __init__(self, nc: Client, settings: GatewaySettings | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.settings = settings or GatewaySettings()
        self.view = Follower(nc)
        self._incarnations: dict[str, str] = {}  # registered here, not folded yet
        self.view.listeners.add(self._folded)
        self._task: asyncio.Task[None] | None = None
        self.closing = asyncio.Event()  # set when the server stops: live feeds end

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._task = asyncio.create_task(self.view.run(), name="gateway-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # ------------------------------------------------------------ reads

    def records(self) -> list[WorkerInfo]:
        return list(self.view.catalog.after(None))

    def record(self, worker_id: str) -> WorkerInfo | None:
        return self.view.records().get(worker_id)

    def stats(self) -> Stats:
        return self.view.catalog.stats()

    async def history(self, worker_id: str, limit: int) -> History:
        events = await self._events(worker_id, limit)
        if not events and self.record(worker_id) is None:
            raise NotFound(worker_id)
        return History(worker_id=worker_id, events=[
            HistoryEvent(seq=e.seq, kind=e.kind, stored_at=e.time, summary=e.summary)
            for e in events
        ])  # fmt: skip

    async def explain(self, worker_id: str) -> Explanation:
        record = self.record(worker_id)
        events = await self._events(worker_id, MAX_HISTORY)
        if record is None and not events:
            raise NotFound(worker_id)
        state = (verdict(record, events, datetime.now(UTC)) if record
                 else "not in the bucket (purged after retention)")  # fmt: skip
        lines = [f"{line.time.isoformat(timespec='milliseconds')}  #{line.seq}  {line.kind}: "
                 f"{line.what}" for line in replay(events)]  # fmt: skip
        return Explanation(worker_id=worker_id, state=state, lines=lines)

    async def _events(self, worker_id: str, limit: int) -> list[Any]:
        try:
            return await read_events(self.nc, EventQuery(worker_id=worker_id, limit=limit))
        except (EventLogError, nats.errors.Error, TimeoutError) as e:
            raise Unavailable(f"the event stream did not answer: {e}") from None

    async def health(self) -> Health:
        """The registry's own health, from `registry.stats` (answered by any instance)."""
        workers = self.stats()
        try:
            msg = await self.nc.request("registry.stats", b"{}", timeout=STATS_TIMEOUT_S)
            answer: dict[str, Any] = json.loads(msg.data)
            if (msg.headers or {}).get("Nats-Service-Error"):
                raise ValueError(msg.headers)
        except Exception:  # noqa: BLE001 - no answer is the finding
            return Health(status="unavailable", reasons=["registry service not answering"],
                          active=None, lag_s=None, pending=None, brake_engaged=False,
                          expiries_held=0, workers=workers)  # fmt: skip
        registry = answer.get("registry") or {}
        active = registry.get("active")
        lag_s, pending = float(answer.get("lag_s", 0.0)), int(answer.get("pending", 0))
        brake = bool(answer.get("brake_engaged", 0))
        reasons = []
        if not active:
            reasons.append("no active registry (a takeover under way?)")
        if lag_s > LAGGING_S:
            reasons.append(f"projector {lag_s:.1f} s behind")
        if brake:
            reasons.append("mass-expiry brake engaged: expiries held")
        return Health(status="degraded" if reasons else "ok", reasons=reasons, active=active,
                      lag_s=lag_s, pending=pending, brake_engaged=brake,
                      expiries_held=int(answer.get("expiries_held", 0)), workers=workers)  # fmt: skip

    # ------------------------------------------------------------ writes

    async def register(self, registration: WorkerRegistration,
                       heartbeat_interval_s: float | None) -> str:  # fmt: skip
        wid = registration.worker_id
        incarnation = f"http-{protocol.new_msg_id()[:16]}"
        event = RegisterEvent(
            worker_id=wid, incarnation=incarnation, sent_at=datetime.now(UTC),
            registration=registration,
            heartbeat_interval_s=heartbeat_interval_s or self.settings.heartbeat_interval_s,
        )  # fmt: skip
        await self._publish("register", event)
        self._incarnations[wid] = incarnation
        await self._until(wid, lambda r: r is not None and r.incarnation == incarnation)
        return wid

    async def heartbeat(self, worker_id: str, status: WorkerStatus, metrics: WorkerMetrics,
                        timestamp: datetime | None) -> None:  # fmt: skip
        sent_at = timestamp or datetime.now(UTC)
        event = HeartbeatEvent(worker_id=worker_id, incarnation=self._incarnation(worker_id),
                               sent_at=sent_at, status=status, metrics=metrics)  # fmt: skip
        await self._publish("heartbeat", event)

    async def unregister(self, worker_id: str) -> None:
        event = UnregisterEvent(worker_id=worker_id, incarnation=self._incarnation(worker_id),
                                sent_at=datetime.now(UTC), reason="unregistered over HTTP")  # fmt: skip
        await self._publish("unregister", event)
        self._incarnations.pop(worker_id, None)
        await self._until(worker_id, lambda r: r is None or not r.live)

    def _folded(self, worker_id: str, record: WorkerInfo | None) -> None:
        """Once the bucket holds a registration made here, the record says it all."""
        if record is not None and self._incarnations.get(worker_id) == record.incarnation:
            del self._incarnations[worker_id]

    def _incarnation(self, worker_id: str) -> str:
        """The incarnation this worker's events carry: its live record's; else the one
        registered here and not folded yet; else an expired record's (a beat revives it)."""
        record = self.record(worker_id)
        if record is not None and record.live:
            return record.incarnation
        mine = self._incarnations.get(worker_id)
        if mine is not None:
            return mine
        if record is not None and record.offline_reason is OfflineReason.EXPIRED:
            return record.incarnation
        raise NotFound(worker_id)

    async def _publish(self, kind: str, event: protocol.Event) -> None:
        stored = await publish_event(self.js, kind, event, attempt_timeout_s=PUBLISH_ATTEMPT_S,
                                     budget_s=self.settings.publish_budget_s, logger=log)  # fmt: skip
        if not stored:
            raise Unavailable(f"the event stream did not store the {kind} in time; retry")

    async def _until(self, worker_id: str, folded: Callable[[WorkerInfo | None], bool]) -> None:
        """Until the bucket shows the change (read-your-writes for whoever asks next), or
        SEEN_WITHIN_S: it is stored either way, and will be folded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SEEN_WITHIN_S
        while loop.time() < deadline and not folded(self.record(worker_id)):
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------ the live feed

    @contextlib.asynccontextmanager
    async def changes(self) -> AsyncIterator[asyncio.Queue[Change | None]]:
        """A queue of every bucket change from now on; None once this reader fell too far
        behind (it should start over: list, then follow)."""
        queue: asyncio.Queue[Change | None] = asyncio.Queue(FEED_QUEUE + 1)

        def tell(worker_id: str, record: WorkerInfo | None) -> None:
            if queue.qsize() >= FEED_QUEUE:
                if queue.qsize() == FEED_QUEUE:
                    queue.put_nowait(None)
                return
            queue.put_nowait(Change(worker_id=worker_id, record=record))

        self.view.listeners.add(tell)
        try:
            yield queue
        finally:
            self.view.listeners.discard(tell)
