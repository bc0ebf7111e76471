"""consume -> decode -> fold -> CAS write -> publish availability -> checkpoint.

The projector is the single writer of the bucket. Its checkpoint is the ack
floor of its durable consumer (ack policy `all`): a batch is acknowledged only
after every bucket write of the batch is stored, so the floor never passes an
unwritten effect. At start (and after any fault) it reloads the bucket and
recreates the consumer at floor + 1, so delivery is in order at once; events
already folded are skipped by the record's `event_seq` (exactly-once effect).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Final

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import api

from registry.cancel import raise_if_cancelled
from registry.catalog import Catalog
from registry.fold import (
    Applied,
    Duplicate,
    Ignored,
    Premature,
    Unregistered,
    availability,
    draining,
    evolve,
    routing_key,
)
from registry.protocol import (
    EVENT_KIND,
    EVENT_TYPES,
    PURGED,
    Availability,
    BadEvent,
    Control,
    Cordon,
    Event,
    HeartbeatEvent,
    LateEvent,
    RegisterEvent,
    WorkerCapability,
    WorkerInfo,
    WorkerStatus,
    available_subject,
    control_subject,
    decode_event,
    encode,
    new_msg_id,
)
from registry.retention import Markers, OfflineSince, loaded_markers, offline_of, shrunk
from registry.server import provision
from registry.server.consume import Puller
from registry.server.jsmeta import ack_meta
from registry.server.lease import LeaseLost
from registry.server.link import Link
from registry.server.pipeline import Pipeline, PublishFailed
from registry.server.provision import DEFAULT_NAMES, Names
from registry.server.settings import RegistrySettings
from registry.server.store import TTL_HEADER, Bucket, Entry, is_conflict, purge_headers
from registry.share import Parts
from registry.sweep import ServerClock

log = structlog.get_logger("registry.projector")

WRITE_TIMEOUT_S = 5.0
CLOCK_READ_EVERY_S = 5.0  # the server's `ts`, also while events keep coming


STREAM_CLOCK_SLACK: Final = timedelta(seconds=2)  # stored times vs the stream's creation
CONTROL_EVERY_S: Final = {"drain": 5.0, "uncordon": 5.0}
"""The least time between two control messages of an action to one process (default 1 s):
a drain is repeated on the heartbeats of a worker that is finishing its work, and a lifted
drain on the heartbeats of the process that was draining, for UNDRAIN_REPEAT_S."""
CONTROL_KEPT_S: Final = max(1.0, *CONTROL_EVERY_S.values())
UNDRAIN_REPEAT_S: Final = 60.0


def _said(cordon: Cordon) -> str:
    return f"drained by {cordon.by}" + (f": {cordon.reason}" if cordon.reason else "")


def _last_stored(record: WorkerInfo) -> datetime:
    """The stored time of the newest event folded into a record."""
    return max(record.last_heartbeat, record.offline_at or record.last_heartbeat)


YIELD_EVERY = 512  # events folded between turns of the event loop


class ResyncNeeded(Exception):
    """The bucket changed under us, or a write failed: reload and resume."""


@dataclass
class Counters:
    events_applied: int = 0
    events_duplicate: int = 0
    events_ignored: int = 0
    events_rejected: int = 0
    events_unregistered: int = 0
    bucket_writes: int = 0
    availability_published: int = 0
    foreign_writes_repaired: int = 0  # bucket values written by someone else, overwritten
    streams_replaced: int = 0  # times records were found to come from an event stream now gone
    controls_sent: int = 0
    offline_purged: int = 0
    resyncs: int = 0
    last_seq: int = 0
    pending: int = 0
    lag_s: float = 0.0


def _per_kind() -> dict[str, int]:
    return dict.fromkeys(EVENT_TYPES, 0)


@dataclass
class KindCounts:
    """The fresh events of Counters again, per kind (`register`, `heartbeat`, ...): for
    metrics. Rejected ones per (kind, reason code); a kind the subject does not name
    is `unknown`."""

    applied: dict[str, int] = field(default_factory=_per_kind)
    duplicate: dict[str, int] = field(default_factory=_per_kind)
    ignored: dict[str, int] = field(default_factory=_per_kind)
    unregistered: dict[str, int] = field(default_factory=_per_kind)
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)


def _subject_kind(subject: str) -> str:
    kind = subject.split(".", 2)[1] if subject.count(".") >= 2 else ""
    return kind if kind in EVENT_TYPES else "unknown"


class RecordsView(Mapping[str, WorkerInfo]):
    """Read-only view of the projector's copy of the bucket (no copying)."""

    def __init__(self, entries: dict[str, Entry]) -> None:
        self._entries = entries

    def __getitem__(self, key: str) -> WorkerInfo:
        return self._entries[key].record

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Batch:
    before: dict[str, tuple[object, ...] | None] = field(default_factory=dict)
    announce: set[str] = field(default_factory=set)
    dirty: set[str] = field(default_factory=set)
    controls: dict[str, Control] = field(default_factory=dict)
    stored: dict[str, float] = field(default_factory=dict)  # the oldest event staged per worker


class Projector:
    def __init__(
        self,
        link: Link,
        settings: RegistrySettings,
        clock: ServerClock,
        names: Names = DEFAULT_NAMES,
        on_change: Callable[[WorkerInfo], None] = lambda r: None,
        on_reset: Callable[[Mapping[str, WorkerInfo]], None] = lambda r: None,
        on_premature: Callable[[WorkerInfo, bool], None] = lambda r, late: None,
        on_written: Callable[[float], None] = lambda latency_s: None,
        on_purged: Callable[[str], None] = lambda worker_id: None,
    ) -> None:
        self.link = link
        self.nc = nc = link.nc
        self.js = nc.jetstream()
        self.settings = settings
        self.clock = clock
        self.names = names
        self.bucket = Bucket(nc, names.bucket)
        self.pipeline = Pipeline(link)
        self.parts = Parts()  # one copy of what the fleet's registrations repeat
        self.entries: dict[str, Entry] = {}
        self.catalog = Catalog()  # the records again, indexed for the query service
        self.markers = Markers()  # the bucket's markers of deleted keys, while they last
        self.offline = OfflineSince()  # offline records, oldest first: purged after retention
        self.counters = Counters()
        self.kinds = KindCounts()
        self._epoch = link.epoch  # the epoch this projector last synced in
        self.on_change = on_change
        self.on_reset = on_reset
        self.on_premature = on_premature  # (record, late): a verdict was refused as premature
        self.on_written = on_written  # seconds from an event's stored time to its write's ack
        self.on_purged = on_purged  # a worker's record was purged: forget it everywhere
        self._last_control: dict[tuple[str, str, str], float] = {}
        self._undrained: dict[str, tuple[str, float]] = {}  # id -> (incarnation, until)
        self._clashes_logged: set[tuple[str, str]] = set()
        self._counted_through = 0
        self._clock_read_at = 0.0  # monotonic
        self._step = "start"  # of a resync, for the log when it fails
        self._purge_at = 0.0  # monotonic: the next purge pass, under load or idle
        self._floor = 0  # the checkpoint this projector last synced at
        self._peak = 0  # the most records held since the tables were last sized

    # ------------------------------------------------------------ views

    def records(self) -> Mapping[str, WorkerInfo]:
        return RecordsView(self.entries)

    def stats(self) -> dict[str, int | float]:
        return asdict(self.counters)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Project until cancelled; faults are retried with backoff."""
        await self.pipeline.start()
        try:
            await self._run()
        finally:
            with contextlib.suppress(Exception):
                await self.pipeline.stop()

    async def _run(self) -> None:
        backoff, patience = 0.1, provision.API_TIMEOUT_S
        while True:
            try:
                with provision.patience(patience):  # longer after each failed resync
                    await self._sync()
                backoff, patience = 0.1, provision.API_TIMEOUT_S
                await self._consume()
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as e:  # noqa: BLE001 - every fault here is retried
                raise_if_cancelled()  # nats-py turns some cancellations into errors
                if not isinstance(e, ResyncNeeded):
                    self.link.trouble()  # no answer: workers could not reach the stream either
                self.counters.resyncs += 1
                patience = min(patience * 2, provision.MAX_PATIENCE_S)
                log.warning("projector_resync", error=f"{type(e).__name__}: {e}", step=self._step,
                            retry_in_s=backoff, api_timeout_s=patience)  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)  # resume soon after the stream answers

    async def _sync(self) -> None:
        self.link.fell_behind()
        self._epoch = self.link.epoch
        self.link.fence()  # only the active registry recreates the consumer
        self._step = "provision"
        await provision.provision(self.nc, self.names, self.settings.replicas)  # a lost store
        self._step = "load bucket"
        expiring: dict[str, float] = {}
        self.entries, tombstones = await self.bucket.load_all(share=self.parts, expiring=expiring)
        self.markers = loaded_markers(tombstones, expiring)
        self._step = "check stream origin"
        await self._forget_another_streams_records()
        self.catalog.reset(e.record for e in self.entries.values())
        self.offline = offline_of(
            (wid, e.record.offline_at.timestamp() if e.record.offline_at else None)
            for wid, e in self.entries.items()
        )  # fmt: skip
        self._step = "read checkpoint"
        floor = await provision.consumer_ack_floor(self.nc, self.names)
        self._floor = floor or 0
        start = floor + 1 if floor and self.entries else 1
        self.link.fence()
        self._step = "recreate consumer"
        await provision.reset_consumer(self.nc, self.names, start)
        self._step = "fold"
        self.on_reset(self.records())
        log.info("projector_started", workers=len(self.entries), from_seq=start)

    async def _forget_another_streams_records(self) -> None:
        """Records folded from an event stream that is no longer there.

        A stream deleted and provisioned again (or restored from an older backup)
        starts its sequence again: every new event at or below a record's
        `event_seq` would be skipped as a duplicate, and the bucket would freeze. A
        record can only come from this stream if its event is in it: its `event_seq`
        at most the stream's last sequence, its stored times after the stream was
        created. Records that cannot be are deleted (loudly); their workers are
        asked to register again at their next heartbeat, and fold from the new stream.
        """
        origin = await provision.stream_origin(self.nc, self.names)
        if origin is None:
            return
        created, last_seq = origin
        before = created - STREAM_CLOCK_SLACK
        stale = [
            wid for wid, e in self.entries.items()
            if e.record.event_seq > last_seq or _last_stored(e.record) < before
        ]  # fmt: skip
        if not stale:
            return
        log.error(
            "event_stream_replaced", stream_created=created.isoformat(), last_seq=last_seq,
            records_forgotten=len(stale),
            hint="the event stream was deleted or restored: records it cannot explain are "
            "deleted; their workers register again at their next heartbeat",
        )  # fmt: skip
        ttl = self.settings.purge_marker_ttl_s
        for wid in stale:
            self.link.fence()
            entry = self.entries.pop(wid)
            revision = await self.bucket.purge(wid, entry.revision, ttl)
            self.markers.add(wid, revision, self.clock.now(time.monotonic()) + ttl)
        self.counters.streams_replaced += 1

    async def _consume(self) -> None:
        size = self.settings.batch_size
        puller = Puller(self.link, self._epoch, self.names.events, self.names.consumer, size)
        await puller.start()
        try:
            while True:
                raise_if_cancelled()
                msgs = await puller.take(size, timeout_s=1.0)
                if msgs:
                    await self._process(msgs)
                    if time.monotonic() - self._clock_read_at > CLOCK_READ_EVERY_S:
                        await self.sync_clock()  # under load too: the leader may change
                    await self._purge()  # on its schedule: under load too
                else:
                    await self._idle()
        finally:
            await puller.stop()

    async def _idle(self) -> None:
        self.counters.pending = 0
        self.counters.lag_s = 0.0
        await self.sync_clock()
        self.link.caught_up(self._epoch)
        await self._purge()

    async def sync_clock(self) -> None:
        """Read the server's time from a stream info response (`ts`: the stream
        leader's clock when it answered), forward or back."""
        ts = await provision.server_time(self.nc, self.names)
        self._clock_read_at = time.monotonic()
        if ts is None:
            return
        behind = self.clock.step(ts.timestamp(), time.monotonic())
        if behind:
            log.warning("server_clock_stepped_back", by_s=round(behind, 3),
                        hint="a new stream leader's clock is behind the last one's")  # fmt: skip

    # ------------------------------------------------------------ one batch

    async def _process(self, msgs: list[Msg]) -> None:
        batch = _Batch()
        for i, msg in enumerate(msgs, 1):
            self._fold_one(msg, batch)
            if i % YIELD_EVERY == 0:  # a big batch on a starved CPU: let the lease renew
                await asyncio.sleep(0)
        await self._write(batch)
        await self._announce(batch)
        await self._flush(batch)
        await self._send_controls(batch)
        await msgs[-1].ack()
        last = ack_meta(msgs[-1])
        self.counters.last_seq = last.seq
        self.counters.pending = last.pending
        self.counters.lag_s = max(0.0, self.clock.now(time.monotonic()) - last.stored_ns / 1e9)
        if last.pending == 0:
            self.link.caught_up(self._epoch)

    def _fold_one(self, msg: Msg, batch: _Batch) -> None:
        meta = ack_meta(msg)
        seq, stored_at = meta.seq, meta.stored_at
        self.clock.observe(meta.stored_ns / 1e9, time.monotonic())
        fresh = seq > self._counted_through  # a batch folded again after a resync counts once
        self._counted_through = max(seq, self._counted_through)
        try:
            event = decode_event(msg.subject, msg.data)
        except BadEvent as e:
            self._reject(seq, msg.subject, e.reason, str(e), fresh)
            return
        except Exception as e:  # noqa: BLE001 - a decoder bug must not stall the stream either
            log.error("decoder_failed", seq=seq, error=f"{type(e).__name__}: {e}")
            self._reject(seq, msg.subject, "decoder_failed", type(e).__name__, fresh)
            return
        self._fold_event(event, seq, stored_at, batch, fresh)

    def _reject(self, seq: int, subject: str, code: str, reason: str, fresh: bool) -> None:
        if fresh:
            self.counters.events_rejected += 1
            key = (_subject_kind(subject), code)
            self.kinds.rejected[key] = self.kinds.rejected.get(key, 0) + 1
            log.warning("event_rejected", seq=seq, subject=subject, code=code, reason=reason)

    def _fold_event(
        self, event: Event, seq: int, stored_at: datetime, batch: _Batch, fresh: bool
    ) -> None:
        wid, kind = event.worker_id, EVENT_KIND[type(event)]
        if isinstance(event, RegisterEvent):
            event = msgspec.structs.replace(
                event, registration=self.parts.registration(event.registration)
            )
        entry = self.entries.get(wid)
        record = entry.record if entry else None
        outcome = evolve(record, event, seq, stored_at)
        match outcome:
            case Applied(new):
                if record is not None and record.live and record.incarnation != new.incarnation:
                    # a restart (the old process died) or a second process: tell the old one
                    self._supersede(wid, record.incarnation, new.incarnation, stored_at, batch)
                batch.before.setdefault(wid, routing_key(record))
                self._stage(wid, new, batch, stored_at)
                self._tell_drain(wid, record, new, stored_at, batch)
                self.counters.events_applied += fresh
                self.kinds.applied[kind] += fresh
                log.debug("event_applied", seq=seq, worker_id=wid, status=str(new.status))
            case Duplicate():
                self.counters.events_duplicate += fresh
                self.kinds.duplicate[kind] += fresh
                if record is not None and seq == record.event_seq:
                    batch.announce.add(wid)  # re-announce what a crash may have cut off
            case Ignored(reason):
                self.counters.events_ignored += fresh
                self.kinds.ignored[kind] += fresh
                log.info("event_ignored", seq=seq, worker_id=wid, reason=reason)
                if isinstance(outcome, Premature) and record is not None:
                    self.on_premature(record, isinstance(event, LateEvent))
                if isinstance(event, HeartbeatEvent) and record is not None:
                    if event.incarnation != record.incarnation:  # a replaced process beats on
                        self._supersede(wid, event.incarnation, record.incarnation, stored_at,
                                        batch, clash=True)  # fmt: skip
            case Unregistered(reason):
                self.counters.events_unregistered += fresh
                self.kinds.unregistered[kind] += fresh
                log.info("event_unregistered_worker", seq=seq, worker_id=wid, reason=reason)
                if self._recent(stored_at):
                    batch.controls[wid] = Control(action="register", reason=reason)

    def _stage(self, wid: str, record: WorkerInfo, batch: _Batch, stored_at: datetime) -> None:
        batch.stored.setdefault(wid, stored_at.timestamp())
        entry = self.entries.get(wid)
        if entry is None:
            self.entries[wid] = Entry(record, self.markers.pop(wid))
            offline_before = None
        else:
            offline_before = entry.record.offline_at
            entry.record = record
        if record.offline_at is not offline_before:  # went offline or came back
            self._track_offline(record)
        self.catalog.put(record)
        batch.dirty.add(wid)

    async def _write(self, batch: _Batch) -> None:
        """One CAS write per touched worker (coalesced), pipelined with the batch's announcements."""
        for wid in batch.dirty:
            entry = self.entries[wid]
            headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(entry.revision)}
            on_ack = partial(self._stored, entry, batch.stored[wid])
            await self.pipeline.publish(self.bucket.prefix + wid, encode(entry.record), headers, on_ack)
        self.counters.bucket_writes += len(batch.dirty)

    def _stored(self, entry: Entry, event_stored_s: float, revision: int) -> None:
        entry.revision = revision
        self.on_change(entry.record)
        self.on_written(max(0.0, self.clock.now(time.monotonic()) - event_stored_s))

    async def _announce(self, batch: _Batch) -> None:
        """Availability for workers whose routing fields changed; written with the batch."""
        for wid in set(batch.before) | batch.announce:
            record = self.entries[wid].record
            if wid not in batch.announce and routing_key(record) == batch.before[wid]:
                continue
            headers = {api.Header.MSG_ID.value: f"{wid}.{record.event_seq}"}
            await self.pipeline.publish(available_subject(wid), encode(availability(record)), headers)
            self.counters.availability_published += 1

    async def _flush(self, batch: _Batch) -> None:
        try:
            await self.pipeline.flush(WRITE_TIMEOUT_S)
        except PublishFailed as e:
            if is_conflict(e):
                await self._repair(batch, e)
                return
            raise

    async def _repair(self, batch: _Batch, conflict: PublishFailed) -> None:
        """A CAS write found a revision it did not write. A value that is not a record
        was written by someone else (in a secured deployment: the JetStream API
        answering a request whose reply subject named the key): write ours over it,
        and announce the worker again. A record means another writer of records (a
        second registry, an admin): resync, and fold from what the bucket says."""
        for wid in batch.dirty:
            entry = self.entries.get(wid)
            if entry is None:
                continue
            found = await self.bucket.current(wid)
            if found is None:  # no value: a marker, or nothing (the marker expired)
                revision, theirs = await self.bucket.last_revision(wid), None
            else:
                revision, theirs = found
            if revision == entry.revision:
                continue
            self.link.fence()
            if theirs is not None:
                raise ResyncNeeded(f"bucket key was written by someone else: {conflict}")
            entry.revision = await self.bucket.overwrite(wid, entry.record, revision)
            self.on_change(entry.record)
            await self._announce_again(wid, entry.record)
            if found is None:  # a marker came or went other than this projector expected
                log.info("write_over_marker_repaired", worker_id=wid, revision=revision)
                continue
            self.counters.foreign_writes_repaired += 1
            log.warning("foreign_write_repaired", worker_id=wid, revision=revision)

    async def _announce_again(self, wid: str, record: WorkerInfo) -> None:
        """Availability once more (a fresh Nats-Msg-Id: the last one may be deduplicated)."""
        headers = {api.Header.MSG_ID.value: f"{wid}.{record.event_seq}.{new_msg_id()}"}
        await self.js.publish(available_subject(wid), encode(availability(record)), headers=headers)
        self.counters.availability_published += 1

    # ------------------------------------------------------------ control

    def _recent(self, stored_at: datetime) -> bool:
        age = self.clock.now(time.monotonic()) - stored_at.timestamp()
        return age < self.settings.control_max_age_s

    def _supersede(
        self, wid: str, older: str, newer: str, stored_at: datetime, batch: _Batch,
        clash: bool = False,
    ) -> None:  # fmt: skip
        """A newer registration won the worker id: tell the older incarnation to stop.

        After a restart the older process is gone and nobody listens; a heartbeat
        from it (`clash`) proves two processes claim one id, which is logged as an
        error once per incarnation."""
        if not self._recent(stored_at):
            return  # folded again after a restart, or long ago: nobody to tell
        if clash and (wid, older) not in self._clashes_logged:
            self._clashes_logged.add((wid, older))
            log.error("identity_clash", worker_id=wid, superseded=older, registered=newer)
        reason = f"worker id {wid} was registered by another process (incarnation {newer})"
        batch.controls[wid] = Control(action="superseded", reason=reason, incarnation=older)

    def _tell_drain(
        self, wid: str, before: WorkerInfo | None, after: WorkerInfo, stored_at: datetime,
        batch: _Batch,
    ) -> None:  # fmt: skip
        """A drained worker's agent is told to finish and leave: when the drain is folded,
        and again on its heartbeats (a message on core NATS may be missed) until it has
        left. An uncordon lifts it."""
        was_draining = before is not None and before.cordon is not None and draining(before)
        cordon = after.cordon
        if cordon is None and not was_draining and wid not in self._undrained:
            return  # the common case: nobody drained, one check per event
        if was_draining and cordon is None and before is not None:  # lifted: say so a while
            self._undrained[wid] = (before.incarnation, time.monotonic() + UNDRAIN_REPEAT_S)
        if not self._recent(stored_at):
            return  # folded long after it was stored: nobody to tell now
        if cordon is not None and draining(after):
            self._undrained.pop(wid, None)
            batch.controls[wid] = Control(action="drain", reason=_said(cordon),
                                          incarnation=after.incarnation)  # fmt: skip
        elif (lifted := self._undrained.get(wid)) and after.live and (
            after.incarnation == lifted[0]
        ):
            batch.controls[wid] = Control(action="uncordon", reason="the drain was lifted",
                                          incarnation=lifted[0])  # fmt: skip

    async def _send_controls(self, batch: _Batch) -> None:
        now = time.monotonic()
        if len(self._last_control) > 100_000:
            self._last_control.clear()
            self._clashes_logged.clear()
        for wid, control in batch.controls.items():
            self.link.fence()
            key = (wid, control.action, control.incarnation)
            if now - self._last_control.get(key, -1e9) < CONTROL_EVERY_S.get(control.action, 1.0):
                continue
            self._last_control[key] = now
            await self.nc.publish(control_subject(wid), encode(control))
            self.counters.controls_sent += 1
            log.info(f"control_{control.action}_sent", worker_id=wid, reason=control.reason,
                     incarnation=control.incarnation)  # fmt: skip

    # ------------------------------------------------------------ retention

    def _track_offline(self, record: WorkerInfo) -> None:
        if record.offline_at is None:
            self.offline.discard(record.worker_id)
        else:
            self.offline.set(record.worker_id, record.offline_at.timestamp())

    async def _purge(self) -> None:
        """A purge pass, at most every `purge_every_s` whether events flow or not.

        Up to `purge_batch` offline records older than the retention are purged
        (their history stays in the stream), and as many markers without a TTL (an
        older version's) are purged again with one. A full pass is followed by
        another after the next batch of events, so purging keeps up with any churn
        while folding goes on between passes."""
        mono = time.monotonic()
        if mono < self._purge_at:
            return
        s = self.settings
        now = self.clock.now(mono)
        if now <= 0:
            return  # the server's clock is not known yet
        self.markers.expire(now)
        self._forget_old_controls(mono)
        due = self.offline.due(now - s.retention_s, s.purge_batch)
        legacy = self.markers.legacy(s.purge_batch - len(due))
        if due or legacy:
            await self._purge_records(due, legacy, now)
        full = len(due) + len(legacy) >= s.purge_batch
        self._purge_at = mono if full else mono + s.purge_every_s
        self._compact()

    async def _purge_records(self, due: list[str], legacy: list[str], now: float) -> None:
        """Purge markers (compare-and-set on the revision) and `purged` availability, both
        with the marker TTL, pipelined; the records leave memory as each is stored."""
        ttl = self.settings.purge_marker_ttl_s
        changed_at = datetime.fromtimestamp(now, UTC)
        position = max(self._floor, self.counters.last_seq)  # every event folded so far
        for wid in due:
            entry = self.entries.get(wid)
            if entry is None:
                continue
            on_ack = partial(self._purged, wid, now + ttl)
            await self.pipeline.publish(self.bucket.prefix + wid, b"",
                                        purge_headers(entry.revision, ttl), on_ack)  # fmt: skip
            await self._announce_purge(availability(entry.record), changed_at, ttl)
        for wid in legacy:  # no record to tell from: as of every event folded, none is kept
            on_ack = partial(self.markers.add, wid, expires_at=now + ttl)
            await self.pipeline.publish(self.bucket.prefix + wid, b"",
                                        purge_headers(self.markers.revisions[wid], ttl), on_ack)  # fmt: skip
            gone = Availability(worker_id=wid, available=False, status=WorkerStatus.OFFLINE,
                                capability=WorkerCapability.CPU, changed_at=changed_at,
                                event_seq=position)  # fmt: skip
            await self._announce_purge(gone, changed_at, ttl)
        try:
            await self.pipeline.flush(WRITE_TIMEOUT_S)
        except PublishFailed as e:
            if is_conflict(e):  # written meanwhile, by someone else: reload
                raise ResyncNeeded(f"purge refused: {e}") from e
            raise
        log.info("offline_records_purged", records=len(due), old_markers=len(legacy),
                 workers=len(self.entries), markers=len(self.markers))  # fmt: skip

    async def _announce_purge(self, last: Availability, changed_at: datetime, ttl: int) -> None:
        gone = msgspec.structs.replace(last, available=False, reason=PURGED, changed_at=changed_at)
        headers = {api.Header.MSG_ID.value: f"{gone.worker_id}.{gone.event_seq}.{PURGED}",
                   TTL_HEADER: str(ttl)}  # fmt: skip
        await self.pipeline.publish(available_subject(gone.worker_id), encode(gone), headers)
        self.counters.availability_published += 1

    def _purged(self, wid: str, marker_expires_at: float, revision: int) -> None:
        """A record's purge marker is stored: nothing of the worker stays in memory."""
        self.entries.pop(wid, None)
        self.catalog.remove(wid)
        self.offline.discard(wid)
        self.markers.add(wid, revision, marker_expires_at)
        self.counters.offline_purged += 1
        self.on_purged(wid)
        log.debug("offline_record_purged", worker_id=wid, revision=revision)

    def _compact(self) -> None:
        """Once the records are down to a quarter of their peak (a wave of churn purged),
        copy the tables at the size of what is left: a dict keeps the size of its peak.
        The shared-parts caches start again too (bounded, but filled by workers gone):
        records keep the parts they point at."""
        n = len(self.entries)
        self._peak = max(self._peak, n)
        if not shrunk(n, self._peak):
            return
        self.entries = dict(self.entries)
        self.catalog.compact()
        self.parts = Parts()
        log.info("projector_tables_compacted", workers=n, peak=self._peak)
        self._peak = n

    def _forget_old_controls(self, mono: float) -> None:
        """The control rate limit looks CONTROL_KEPT_S back at most: keep no more than that;
        a lifted drain is repeated UNDRAIN_REPEAT_S at most."""
        if self._last_control:
            self._last_control = {
                k: t for k, t in self._last_control.items() if mono - t < CONTROL_KEPT_S
            }
        if self._undrained:
            self._undrained = {w: u for w, u in self._undrained.items() if u[1] > mono}
        if self._clashes_logged:
            self._clashes_logged = {c for c in self._clashes_logged if c[0] in self.entries}
