"""The fleet at a moment: WORKER_EVENTS folded up to it with the projector's pure fold.

    fleet = await fleet_at(nc, when, retention_s=86400)
    fleet.records    # worker id -> WorkerInfo, as the bucket held them at `when`
    fleet.reach      # worker id -> Reach, for the records whose history was trimmed
    fleet.unknown    # worker ids that may have been registered then, beyond reach

Every message stored at or before the moment is decoded and folded with
`registry.fold.evolve`, in stream order, as the projector does: an event that
does not decode is skipped, and an offline record is dropped once it has been
offline for the retention (the projector deletes it from the bucket then).

Reach. The stream keeps the last `max_msgs_per_subject` (100) messages per
worker and kind. A subject holding fewer has lost nothing. A full one may have
lost its oldest messages, and says nothing about how many:

- if it still holds one stored at or before the moment, the latest events of
  that kind before the moment are there and only older ones are gone: the
  record is `trimmed` (its `version` counts only the events still held; after
  a lost registration of the same incarnation, `registered_at` may be later);
- if all it holds were stored after the moment, every event of that kind
  before the moment may be gone: the record is `incomplete` for that kind (a
  worker still beating every 5 s keeps 100 heartbeats, 8m20s: a moment further
  back misses its heartbeats, so its metrics, status and any verdict judged on
  them are not those of then);
- a worker whose registrations are all after the moment, in a full subject, may
  have been registered then: it is `unknown` (it has no record to show).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Final

import msgspec
from nats.aio.client import Client

from registry import eventlog
from registry.fold import Applied, evolve
from registry.protocol import EVENT_KIND, EVENTS_STREAM, RegisterEvent, WorkerInfo, decode_event
from registry.server.jsmeta import ack_meta
from registry.share import Parts
from registry.timeparse import format_instant

REGISTER: Final = EVENT_KIND[RegisterEvent]
YIELD_EVERY: Final = 128  # events folded between turns of the loop (128 registrations: ~10 ms)


class OutOfReach(ValueError):
    """Nothing the stream holds was stored by then (or it holds nothing)."""


class TooManyEvents(ValueError):
    """More events stored by then than the caller would fold."""


class Reach(msgspec.Struct, frozen=True, kw_only=True):
    """What a record's trimmed history lacks (see the module's docstring)."""

    trimmed: list[str] = []  # kinds: older events gone, the latest before the moment kept
    missing: list[str] = []  # kinds: every event before the moment may be gone

    @property
    def state(self) -> str:
        return "incomplete" if self.missing else "trimmed"


class FleetAt(msgspec.Struct, kw_only=True):
    """The fleet as the bucket held it at `at`, and how far that can be trusted."""

    at: datetime
    through_seq: int  # the last stream sequence stored at or before `at`
    events: int  # messages folded (those the stream still holds)
    records: dict[str, WorkerInfo]
    reach: dict[str, Reach]  # only records whose history was trimmed
    unknown: list[str]  # may have been registered at `at`: registrations trimmed
    purged: int  # offline records dropped after the retention, by `at`
    limit: int  # the stream's max_msgs_per_subject (0: none)

    def sorted_records(self) -> list[WorkerInfo]:
        return [self.records[k] for k in sorted(self.records)]


class Replay:
    """PURE: messages in stream order -> records, as the projector folds them."""

    def __init__(self, retention_s: float) -> None:
        self.records: dict[str, WorkerInfo] = {}
        self.seen: set[str] = set()  # subjects with a message folded
        self.retention = timedelta(seconds=retention_s)
        self.events = self.rejected = self.purged = self.last_seq = 0
        self._offline: list[tuple[datetime, str]] = []  # (offline_at, id), a heap
        self._parts = Parts()  # one copy of repeated registration parts, as the projector

    def fold(self, seq: int, stored_at: datetime, subject: str, data: bytes) -> None:
        self.seen.add(subject)
        self.events += 1
        self.last_seq = seq
        self.purge(stored_at)
        try:
            event = decode_event(subject, data)
        except Exception:  # noqa: BLE001 - BadEvent or a decoder bug: the projector skips both
            self.rejected += 1
            return
        if isinstance(event, RegisterEvent):  # equal values; fewer objects for the collector
            event = msgspec.structs.replace(
                event, registration=self._parts.registration(event.registration)
            )
        outcome = evolve(self.records.get(event.worker_id), event, seq, stored_at)
        if isinstance(outcome, Applied):
            record = outcome.record
            self.records[event.worker_id] = record
            if record.offline_at is not None:
                heapq.heappush(self._offline, (record.offline_at, event.worker_id))

    def purge(self, now: datetime) -> None:
        """Drop records offline since before `now - retention` (the projector's rule)."""
        cutoff = now - self.retention
        while self._offline and self._offline[0][0] < cutoff:
            offline_at, wid = heapq.heappop(self._offline)
            record = self.records.get(wid)
            if record is not None and record.offline_at == offline_at:
                del self.records[wid]
                self.purged += 1


def reach(
    records: Mapping[str, WorkerInfo], seen: set[str], counts: Mapping[str, int], limit: int
) -> tuple[dict[str, Reach], list[str]]:
    """PURE. Which records lost history, and which workers may be missing altogether.

    `seen`: subjects with a message stored at or before the moment; `counts`: what
    each subject holds now (read after the scan, so a trim during it is counted)."""
    trimmed: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}
    unknown: list[str] = []
    full = sorted(s for s, n in counts.items() if n >= limit) if limit > 0 else []
    for subject in full:
        _, kind, wid = [*subject.split(".", 2), "", ""][:3]
        if wid in records:
            (trimmed if subject in seen else missing).setdefault(wid, []).append(kind)
        elif kind == REGISTER and subject not in seen:
            unknown.append(wid)
    out = {
        wid: Reach(trimmed=trimmed.get(wid, []), missing=missing.get(wid, []))
        for wid in sorted(trimmed.keys() | missing.keys())
    }
    return out, sorted(unknown)


async def fleet_at(
    nc: Client, at: datetime, retention_s: float, stream: str = EVENTS_STREAM,
    max_events: int | None = None,
) -> FleetAt:  # fmt: skip
    """Fold the stream through the last message stored at or before `at`, giving the
    event loop up every YIELD_EVERY events (the registry's service folds beside its
    projector); past `max_events`, give up (TooManyEvents)."""
    info = await eventlog.stream_info(nc, stream)
    replay = Replay(retention_s)
    async for batch in eventlog.scan(nc, stream, at):
        if max_events is not None and replay.events + len(batch) > max_events:
            raise TooManyEvents(f"more than {max_events:,} events were stored by "
                                f"{format_instant(at)}")  # fmt: skip
        for i, msg in enumerate(batch, 1):
            meta = ack_meta(msg)
            replay.fold(meta.seq, meta.stored_at, msg.subject, msg.data)
            if i % YIELD_EVERY == 0:
                await asyncio.sleep(0)
    if not replay.events:
        raise OutOfReach(_nothing_by(at, info))
    replay.purge(at)
    limit = int(info["config"].get("max_msgs_per_subject") or 0)
    counts = await eventlog.subject_counts(nc, stream, ">") if limit > 0 else {}
    trimmed, unknown = reach(replay.records, replay.seen, counts, limit)
    return FleetAt(
        at=at, through_seq=replay.last_seq, events=replay.events, records=replay.records,
        reach=trimmed, unknown=unknown, purged=replay.purged, limit=max(limit, 0),
    )  # fmt: skip


def _nothing_by(at: datetime, info: dict[str, object]) -> str:
    state = info.get("state")
    first = state.get("first_ts") if isinstance(state, dict) and state.get("messages") else None
    if first is None:
        return f"{EVENTS_STREAM} holds no events"
    oldest = format_instant(datetime.fromisoformat(str(first)))
    return (f"nothing was stored by {format_instant(at)}: the oldest event {EVENTS_STREAM} "
            f"holds is from {oldest}")  # fmt: skip


def summary(fleet: FleetAt, shown: Iterable[str] | None = None) -> str:
    """One line for people: the moment, and how complete the answer is."""
    ids = list(fleet.records) if shown is None else list(shown)
    incomplete = sum(1 for w in ids if w in fleet.reach and fleet.reach[w].missing)
    trimmed = sum(1 for w in ids if w in fleet.reach and not fleet.reach[w].missing)
    parts = [f"as of {format_instant(fleet.at)} (through event {fleet.through_seq})"]
    if incomplete:
        parts.append(f"{incomplete} incomplete: events of theirs before then were trimmed "
                     f"(the stream keeps {fleet.limit} per worker and kind)")  # fmt: skip
    if trimmed:
        parts.append(f"{trimmed} trimmed: older events gone, the latest before then kept "
                     "(version short)")  # fmt: skip
    if fleet.unknown:
        more = ", ..." if len(fleet.unknown) > 5 else ""
        parts.append(f"{len(fleet.unknown)} unknown: registered 100+ times since, so maybe "
                     f"then too, not shown ({', '.join(fleet.unknown[:5])}{more})")  # fmt: skip
    if not (incomplete or trimmed or fleet.unknown):
        parts.append("complete")
    return "; ".join(parts)
