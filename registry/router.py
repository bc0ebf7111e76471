"""Router: follows `worker.available.>` into memory and answers pick() from it.

Embed it in a dispatcher:

    router = await Router.connect("nats://127.0.0.1:4222")
    await router.ready()                      # the whole fleet as of now is known
    worker = router.pick(capability="gpu", content_type="video")
    if worker is not None:
        send_job_to(worker.worker_id)         # your dispatch; the router holds a slot
    await router.close()

The index groups workers by profile (capability and content types; a fleet
has a handful) and, inside each, the available ones by load level in sorted
order, so pick() costs a few dictionary look-ups whatever the size of the
fleet. A pick holds one of the worker's free slots in this router until the
worker's next availability update (or `hold_s`, or `release()`), so one router
does not pile jobs onto the same worker between two heartbeats; ties are
broken at random, so several routers spread over equally good workers instead
of all choosing the same one.

Imports: `registry.protocol` and nats-py only.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Final

import msgspec
import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from registry.protocol import (
    AVAILABILITY_DECODER,
    AVAILABILITY_STREAM,
    Availability,
    WorkerCapability,
)

log = structlog.get_logger("registry.router")

LoadKey = tuple[float, int]
"""(busy fraction, -free slots): smaller is less loaded."""

_SERVED_BY: Final = {
    "cpu": ("cpu", "hybrid"),
    "gpu": ("gpu", "hybrid"),
    "hybrid": ("hybrid",),
}
_ALL_CAPABILITIES: Final = ("cpu", "gpu", "hybrid")
_END: Final = object()


class _Level:
    """The workers at one load level: O(1) add, remove and uniform random choice."""

    __slots__ = ("ids", "pos")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}

    def add(self, wid: str) -> None:
        self.pos[wid] = len(self.ids)
        self.ids.append(wid)

    def remove(self, wid: str) -> None:
        i = self.pos.pop(wid)
        last = self.ids.pop()
        if last != wid:
            self.ids[i] = last
            self.pos[last] = i


class LoadBucket:
    """Workers of one profile that can take a job now, by load level (levels kept sorted)."""

    __slots__ = ("keys", "levels")

    def __init__(self) -> None:
        self.keys: list[LoadKey] = []
        self.levels: dict[LoadKey, _Level] = {}

    def add(self, wid: str, key: LoadKey) -> None:
        level = self.levels.get(key)
        if level is None:
            level = self.levels[key] = _Level()
            bisect.insort(self.keys, key)
        level.add(wid)

    def remove(self, wid: str, key: LoadKey) -> None:
        level = self.levels[key]
        level.remove(wid)
        if not level.ids:
            del self.levels[key]
            del self.keys[bisect.bisect_left(self.keys, key)]

    def ordered(self) -> Iterable[tuple[LoadKey, str]]:
        for key in self.keys:
            for wid in sorted(self.levels[key].ids):
                yield key, wid


class _Profile:
    """What a job asks of a worker: its capability and content types. Workers
    that share a profile share one LoadBucket and one content-type list, so a
    worker costs one entry in the index however many types it takes."""

    __slots__ = ("bucket", "content_types", "key", "types", "workers")

    def __init__(self, key: tuple[str, tuple[str, ...]], content_types: list[str]) -> None:
        self.key = key  # (capability, content types as listed)
        self.workers = 0  # in the index with this profile; at 0 the profile is dropped
        self.content_types = content_types  # shared by every Availability of the profile
        self.types = frozenset(content_types)
        self.bucket = LoadBucket()

    def serves(self, capabilities: tuple[str, ...], content_type: str | None) -> bool:
        if self.key[0] not in capabilities:
            return False
        return content_type is None or not self.types or content_type in self.types


class _Worker:
    __slots__ = ("avail", "holds", "key", "profile")

    def __init__(self, avail: Availability, profile: _Profile) -> None:
        self.avail = avail
        self.profile = profile
        self.holds: list[float] | None = None  # hold expiry times, oldest first; None: none
        self.key: LoadKey | None = None

    def free(self) -> int:
        a = self.avail
        return a.max_concurrent_tasks - a.active_tasks - (len(self.holds) if self.holds else 0)

    def load(self) -> LoadKey | None:
        """Where the worker sits now, or None when it cannot take a job."""
        free = self.free()
        if not self.avail.available or free <= 0:
            return None
        busy = self.avail.max_concurrent_tasks - free
        return (busy / self.avail.max_concurrent_tasks, -free)


class AvailabilityIndex:
    """The in-memory picture a router decides on. Pure: no NATS, clock passed in.

    Workers are grouped by profile (capability, content types); a fleet has a
    handful of profiles, however many workers. pick() looks at the best load
    level of each profile that can take the job (the list of those profiles
    is cached per request), so its cost does not depend on the fleet's size.
    Availability values taken in are shared, not copied: treat them (and
    their content-type lists) as read-only.
    """

    def __init__(self, rng: random.Random | None = None, hold_s: float = 10.0) -> None:
        self.rng = rng or random.Random()
        self.hold_s = hold_s
        self.workers: dict[str, _Worker] = {}
        self._profiles: dict[tuple[str, tuple[str, ...]], _Profile] = {}
        self._serving: dict[tuple[str | None, str | None], list[LoadBucket]] = {}
        self._strings: dict[str, str] = {}
        self._expiry: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self.workers)

    def update(self, avail: Availability) -> bool:
        """Take a worker's new availability; its held slots are now in its own count."""
        w = self.workers.get(avail.worker_id)
        if w is not None and avail.event_seq < w.avail.event_seq:
            return False
        profile = self._profile_of(avail)
        avail = msgspec.structs.replace(
            avail, supported_content_types=profile.content_types, reason=self._shared(avail.reason)
        )  # fmt: skip
        if w is None:
            w = self.workers[avail.worker_id] = _Worker(avail, profile)
            profile.workers += 1
        self._unplace(w)
        if w.profile is not profile:
            self._leave(w.profile)
            profile.workers += 1
        w.avail = avail
        w.profile = profile
        w.holds = None
        self._place(w)
        return True

    def get(self, worker_id: str) -> Availability | None:
        w = self.workers.get(worker_id)
        return w.avail if w else None

    def pick(
        self, capability: str | None = None, content_type: str | None = None, now: float = 0.0
    ) -> Availability | None:
        """The least loaded worker that can take the job (random among equals); holds a slot."""
        if self._expiry and self._expiry[0][0] <= now:
            self.expire(now)
        wid = self._choose(self._candidates(capability, content_type))
        if wid is None:
            return None
        w = self.workers[wid]
        self._hold(w, now)
        return w.avail

    def available(
        self, capability: str | None = None, content_type: str | None = None, now: float = 0.0
    ) -> list[Availability]:
        """Everyone who could take the job now, least loaded first."""
        self.expire(now)
        found = [kw for b in self._candidates(capability, content_type) for kw in b.ordered()]
        return [self.workers[wid].avail for _, wid in sorted(found)]

    def release(self, worker_id: str) -> bool:
        """Give back the most recent slot this router holds on the worker."""
        w = self.workers.get(worker_id)
        if w is None or not w.holds:
            return False
        self._unplace(w)
        w.holds.pop()
        self._place(w)
        return True

    def held(self, worker_id: str) -> int:
        w = self.workers.get(worker_id)
        return len(w.holds) if w and w.holds else 0

    def expire(self, now: float) -> None:
        """Drop holds older than hold_s (the worker never reported them)."""
        while self._expiry and self._expiry[0][0] <= now:
            _, wid = heapq.heappop(self._expiry)
            w = self.workers.get(wid)
            if w is not None and w.holds and w.holds[0] <= now:
                self._unplace(w)
                del w.holds[0]
                self._place(w)

    # ------------------------------------------------------------ internals

    def _hold(self, w: _Worker, now: float) -> None:
        self._unplace(w)
        until = now + self.hold_s
        if w.holds is None:
            w.holds = [until]
        else:
            w.holds.append(until)
        heapq.heappush(self._expiry, (until, w.avail.worker_id))
        self._place(w)

    def _place(self, w: _Worker) -> None:
        w.key = w.load()
        if w.key is not None:
            w.profile.bucket.add(w.avail.worker_id, w.key)

    def _unplace(self, w: _Worker) -> None:
        if w.key is not None:
            w.profile.bucket.remove(w.avail.worker_id, w.key)
        w.key = None

    def _shared(self, s: str) -> str:
        """One copy of each distinct short string (reasons repeat across the fleet)."""
        if len(self._strings) > 10_000:
            self._strings.clear()
        return self._strings.setdefault(s, s)

    def _profile_of(self, a: Availability) -> _Profile:
        key = (str(a.capability), tuple(a.supported_content_types))
        profile = self._profiles.get(key)
        if profile is None:
            types = [self._shared(t) for t in a.supported_content_types]
            profile = self._profiles[key] = _Profile(key, types)
            self._serving.clear()  # a new profile may serve cached requests
        return profile

    def _leave(self, profile: _Profile) -> None:
        """A worker left `profile`; the last one out removes it from every request."""
        profile.workers -= 1
        if profile.workers == 0 and self._profiles.get(profile.key) is profile:
            del self._profiles[profile.key]
            self._serving.clear()

    def _candidates(self, capability: str | None, content_type: str | None) -> list[LoadBucket]:
        buckets = self._serving.get((capability, content_type))
        if buckets is None:
            caps = _SERVED_BY.get(capability) if capability else _ALL_CAPABILITIES
            if caps is None:
                raise ValueError(f"unknown capability {capability!r}: use cpu, gpu or hybrid")
            buckets = [p.bucket for p in self._profiles.values() if p.serves(caps, content_type)]
            if len(self._serving) > 10_000:  # content types are the callers' strings
                self._serving.clear()
            self._serving[(capability, content_type)] = buckets
        return buckets

    def _choose(self, buckets: list[LoadBucket]) -> str | None:
        """Uniformly at random among the least loaded workers of these (disjoint) buckets."""
        best: LoadKey | None = None
        levels: list[_Level] = []
        for b in buckets:
            if not b.keys:
                continue
            key = b.keys[0]
            if best is None or key < best:
                best, levels = key, [b.levels[key]]
            elif key == best:
                levels.append(b.levels[key])
        if best is None:
            return None
        if len(levels) == 1:
            ids = levels[0].ids
            return ids[self.rng.randrange(len(ids))]
        n = self.rng.randrange(sum(len(level.ids) for level in levels))
        for level in levels:
            if n < len(level.ids):
                return level.ids[n]
            n -= len(level.ids)
        raise AssertionError("unreachable")


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
        self._ready = asyncio.Event()
        self._start_seq = 0
        self._last_seq = 0
        self._watchers: set[asyncio.Queue[object]] = set()
        self._owns_connection = False
        self._closed = False

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Router:
        """Connect (reconnecting forever), start following, return without waiting for ready()."""
        nc = await nats.connect(
            url, max_reconnect_attempts=-1, reconnect_time_wait=0.25, name="worker-router",
            error_cb=_log_nats_error,
        )  # fmt: skip
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
        js = self.nc.jetstream()
        state = (await js.stream_info(self._stream)).state
        self._start_seq = state.last_seq if state.messages else 0
        if self._start_seq == 0:
            self._ready.set()
        self._sub = await js.subscribe(
            self._subject, stream=self._stream, cb=self._on_msg, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=self._heartbeat_s, pending_msgs_limit=-1, pending_bytes_limit=-1,
        )  # fmt: skip

    async def ready(self) -> None:
        """Return once every worker's availability as of start() is in memory."""
        await self.start()
        await self._ready.wait()

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

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
        """Every change taken into the index from the first iteration on, until close().

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
        for queue in self._watchers:
            queue.put_nowait(_END)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._owns_connection:
            await self.nc.close()

    async def _on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        self._take(msg.subject, msg.data)
        self._last_seq = meta.sequence.stream
        if not self._ready.is_set() and (
            meta.num_pending == 0 or meta.sequence.stream >= self._start_seq
        ):
            self._ready.set()

    def _take(self, subject: str, data: bytes) -> None:
        try:
            avail = AVAILABILITY_DECODER.decode(data)
        except msgspec.DecodeError as e:
            log.warning("availability_undecodable", subject=subject, error=str(e))
            return
        if subject.rpartition(".")[2] != avail.worker_id:
            log.warning("availability_id_mismatch", subject=subject, worker_id=avail.worker_id)
            return
        if self.index.update(avail):
            taken = self.index.get(avail.worker_id)  # the index's own (shared) value
            for queue in self._watchers:
                queue.put_nowait(taken)
