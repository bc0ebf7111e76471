"""Router: follows `worker.available.>` into memory and answers pick() from it.

Embed it in a dispatcher:

    router = await Router.connect("nats://127.0.0.1:4222")
    await router.ready()                      # the whole fleet as of now is known
    worker = router.pick(capability="gpu", content_type="video")
    if worker is not None:
        send_job_to(worker.worker_id)         # your dispatch; the router holds a slot
    await router.close()

What it decides with is the pure index in registry.router.index.

Imports: `registry.protocol`, `registry.lastvalues`, the index and nats-py only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from registry.connect import Auth, NatsOptions, Reconnect, connect
from registry.fold import availability
from registry.lastvalues import RELIST_S, Arrivals, stream_keys
from registry.protocol import (
    AVAILABILITY_DECODER,
    AVAILABILITY_STREAM,
    PURGED,
    WORKER_INFO_DECODER,
    Availability,
    WorkerCapability,
    encode,
)
from registry.router.index import AvailabilityIndex

log = structlog.get_logger("registry.router")

_END: Final = object()
MAX_QUESTIONS: Final = 64  # registry.get questions in flight for rejected availability
CONSUMER_REQUEST_S: Final = 2.0  # creating (again) the ordered consumer that follows availability


async def _log_nats_error(e: Exception) -> None:
    log.warning("nats_error", error=str(e) or type(e).__name__)


class Router:
    """A live, in-memory view of worker availability; pick() never touches the network."""

    def __init__(
        self,
        nc: Client,
        *,
        stream: str = AVAILABILITY_STREAM,
        subject: str = "worker.available.>",
        hold_s: float = 10.0,
        rng: random.Random | None = None,
        idle_heartbeat_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc = nc
        self.index = AvailabilityIndex(rng, hold_s)
        self._stream = stream
        self._subject = subject
        self._heartbeat_s = idle_heartbeat_s
        self._clock = clock
        self._sub: JetStreamContext.PushSubscription | None = None
        self._prefix = subject.removesuffix(">")
        self._arrivals = Arrivals()  # the workers listed at start(), until each has come
        self._last_seq = 0
        self.rejected = 0  # availability messages not taken: undecodable, out of bounds, wrong id
        self.forgotten = 0  # workers dropped from the index: purged after retention
        self._asking: dict[str, asyncio.Future[None]] = {}  # worker id -> its question
        self._watchers: set[asyncio.Queue[object]] = set()
        self._owns_connection = False
        self._closed = False

    @classmethod
    async def connect(
        cls, url: str, *, creds: str | None = None, nkey: str | None = None,
        tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
        **kwargs: Any,
    ) -> Router:  # fmt: skip
        """Connect (reconnecting forever), start following, return without waiting for ready().

        `url` may list several servers, comma-separated (a cluster); `creds` or `nkey`
        say who the router is, `tls_*` are TLS files (see registry.connect.Auth); the
        rest goes to Router(...)."""
        auth = Auth(creds, nkey, tls_ca, tls_cert, tls_key)
        options = NatsOptions.of(url, "worker-router", reconnect=Reconnect(wait_s=0.25), auth=auth)
        nc = await connect(options, error_cb=_log_nats_error)
        router = cls(nc, **kwargs)
        router._owns_connection = True
        try:
            await router.start()
        except BaseException:
            await nc.close()
            raise
        return router

    async def __aenter__(self) -> Router:
        await self.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Follow the stream: last value of every worker, then every change."""
        if self._sub is not None:
            return
        # nats-py recreates a stalled ordered consumer (its stream's leader died) two idle
        # heartbeats after the last message, in the background, with this context's
        # timeout: a request lost in the election would hold it for the default 5 s
        self._sub = await self.nc.jetstream(timeout=CONSUMER_REQUEST_S).subscribe(
            self._subject, stream=self._stream, cb=self._on_msg, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=self._heartbeat_s, pending_msgs_limit=-1, pending_bytes_limit=-1,
        )  # fmt: skip
        # ready once every worker the stream lists now has come by (its value then, or a
        # newer one); not at "nothing pending", which a busy stream says too early
        try:
            self._arrivals.expect(await stream_keys(self.nc, self._stream, self._prefix))
        except BaseException:  # start() again starts over, rather than wait for no list
            sub, self._sub, self._arrivals = self._sub, None, Arrivals()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            raise

    async def ready(self) -> None:
        """Return once every worker's availability as of start() is in memory (a worker
        whose message went meanwhile, a purged worker's expiring, is not waited for)."""
        await self.start()
        while not self._arrivals.is_done:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELIST_S):
                    await self._arrivals.wait()
            if not self._arrivals.is_done:
                with contextlib.suppress(Exception):  # no answer now: wait and list again
                    self._arrivals.prune(await stream_keys(self.nc, self._stream, self._prefix))

    @property
    def is_ready(self) -> bool:
        return self._arrivals.is_done

    @property
    def last_seq(self) -> int:
        """Stream sequence of the last availability message taken into the index."""
        return self._last_seq

    def pick(
        self, capability: WorkerCapability | str | None = None, content_type: str | None = None
    ) -> Availability | None:
        """The least loaded available worker for the job, or None; holds one of its slots."""
        return self.index.pick(capability, content_type, self._clock())

    def available(
        self, capability: WorkerCapability | str | None = None, content_type: str | None = None
    ) -> list[Availability]:
        return self.index.available(capability, content_type, self._clock())

    def release(self, worker_id: str) -> bool:
        """Return a held slot early (the job was refused or finished before an update)."""
        return self.index.release(worker_id)

    def get(self, worker_id: str) -> Availability | None:
        return self.index.get(worker_id)

    def snapshot(self) -> dict[str, Availability]:
        """Every worker's last known availability (available or not)."""
        return {wid: w.avail for wid, w in self.index.workers.items()}

    def __len__(self) -> int:
        return len(self.index)

    async def changes(self) -> AsyncIterator[Availability]:
        """Every change taken into the index from the first iteration on, until close():
        a worker that leaves it (purged after retention) comes once more, with reason
        `purged`.

        Changes wait in an unbounded queue per iterator; iterate promptly."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            while (item := await queue.get()) is not _END:
                assert isinstance(item, Availability)
                yield item
        finally:
            self._watchers.discard(queue)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for question in list(self._asking.values()):
            question.cancel()
        for queue in self._watchers:
            queue.put_nowait(_END)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._owns_connection:
            await self.nc.close()

    async def _on_msg(self, msg: Msg) -> None:
        self._take(msg.subject, msg.data)
        self._last_seq = msg.metadata.sequence.stream
        if not self._arrivals.is_done:
            self._arrivals.came(msg.subject[len(self._prefix) :])

    def _take(self, subject: str, data: bytes) -> None:
        try:  # the contract's bounds: a forged max_concurrent_tasks of 1,000,000 stays out
            avail = AVAILABILITY_DECODER.decode(data)
        except msgspec.ValidationError as e:
            self._reject(subject, "availability_invalid", error=str(e))
            return
        except msgspec.DecodeError as e:
            self._reject(subject, "availability_undecodable", error=str(e))
            return
        if subject.rpartition(".")[2] != avail.worker_id:
            self._reject(subject, "availability_id_mismatch", worker_id=avail.worker_id)
            return
        self._update(avail)

    def _update(self, avail: Availability) -> None:
        if avail.reason == PURGED and not avail.available:
            self._forget(avail)
            return
        if self.index.update(avail):
            taken = self.index.get(avail.worker_id)  # the index's own (shared) value
            for queue in self._watchers:
                queue.put_nowait(taken)

    def _forget(self, purged: Availability) -> None:
        """The worker's record was purged after retention: it leaves the index (a router
        that starts once the message's TTL has run out never hears of it)."""
        if self.index.remove(purged.worker_id, purged.event_seq):
            self.forgotten += 1
            for queue in self._watchers:
                queue.put_nowait(purged)

    def _reject(self, subject: str, event: str, **fields: object) -> None:
        """Not taken; and since a router that starts now would know nothing else of
        that worker, ask the registry for its record instead (one question at a time)."""
        self.rejected += 1
        log.warning(event, subject=subject, **fields)
        wid = subject.rpartition(".")[2]
        if wid and wid not in self._asking and len(self._asking) < MAX_QUESTIONS:
            task = self._asking[wid] = asyncio.ensure_future(self._ask_registry(wid))
            task.add_done_callback(lambda _: self._asking.pop(wid, None))

    async def _ask_registry(self, wid: str) -> None:
        """The worker's availability from its record (`registry.get`), unless a newer
        one arrived meanwhile."""
        try:
            msg = await self.nc.request("registry.get", encode({"worker_id": wid}), timeout=2.0)
            if (msg.headers or {}).get("Nats-Service-Error"):
                return
            avail = availability(WORKER_INFO_DECODER.decode(msg.data))
        except Exception as e:  # noqa: BLE001 - best effort: the next announcement repairs it too
            log.debug(
                "availability_question_failed", worker_id=wid, error=str(e) or type(e).__name__
            )
            return
        known = self.index.get(wid)
        if avail.worker_id == wid and (known is None or known.event_seq < avail.event_seq):
            self._update(avail)
