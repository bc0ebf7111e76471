"""The fleet at a moment, without a server: the replay (the projector's fold, skips and
purges), the reach of a trimmed stream, and the moments people type."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from registry import protocol, timeparse
from registry.fold import Applied, evolve
from registry.protocol import Event, WorkerInfo
from registry.timetravel import Reach, Replay, reach
from tests.factories import T0, expired, heartbeat, make_info, register, unregister


def subject(e: Event) -> str:
    return protocol.event_subject(protocol.EVENT_KIND[type(e)], e.worker_id)


def replay(events: list[Event], retention_s: float = 86400.0, every_s: float = 1.0) -> Replay:
    r = Replay(retention_s)
    for seq, e in enumerate(events, 1):
        r.fold(seq, T0 + timedelta(seconds=seq * every_s), subject(e), protocol.encode(e))
    return r


def by_evolve(events: list[Event], every_s: float = 1.0) -> dict[str, WorkerInfo]:
    records: dict[str, WorkerInfo] = {}
    for seq, e in enumerate(events, 1):
        outcome = evolve(records.get(e.worker_id), e, seq, T0 + timedelta(seconds=seq * every_s))
        if isinstance(outcome, Applied):
            records[e.worker_id] = outcome.record
    return records


def test_replay_folds_as_evolve_does() -> None:
    events: list[Event] = [
        register("a"), register("b"), heartbeat("a", active=1), heartbeat("b", status="busy"),
        unregister("b"), heartbeat("b"), register("a", incarnation="inc-2"), heartbeat("a"),
    ]  # fmt: skip
    r = replay(events)
    assert r.records == by_evolve(events)
    assert (r.events, r.last_seq, r.rejected) == (8, 8, 0)
    assert r.seen == {"worker.register.a", "worker.register.b", "worker.heartbeat.a",
                      "worker.heartbeat.b", "worker.unregister.b"}  # fmt: skip


def test_replay_skips_what_does_not_decode() -> None:
    r = Replay(86400.0)
    r.fold(1, T0, "worker.register.a", protocol.encode(register("a")))
    r.fold(2, T0, "worker.heartbeat.a", b"not json")
    r.fold(3, T0, "worker.heartbeat.a", protocol.encode(heartbeat("b")))  # id mismatch
    assert (r.events, r.rejected, r.records["a"].event_seq) == (3, 2, 1)


def test_an_offline_record_is_dropped_after_the_retention() -> None:
    events: list[Event] = [register("a"), register("b"), unregister("b"), heartbeat("a")]
    kept = replay(events, retention_s=10.0)
    assert set(kept.records) == {"a", "b"}
    r = replay(events, retention_s=0.5)  # b offline at T0+3s, purged by a's beat at T0+4s
    assert set(r.records) == {"a"} and r.purged == 1
    r = replay(events[:3], retention_s=0.5)
    r.purge(T0 + timedelta(seconds=3.4))
    assert "b" in r.records
    r.purge(T0 + timedelta(seconds=3.6))
    assert "b" not in r.records


def test_a_heartbeat_after_the_purge_finds_no_record_as_in_the_projector() -> None:
    last = T0 + timedelta(seconds=2)
    events: list[Event] = [register("a"), heartbeat("a"), expired("a", last, 15.0)]
    r = Replay(100.0)  # the expiry is stored 30 s after the beat it judged
    for seq, e, at in [(1, events[0], T0), (2, events[1], last),
                       (3, events[2], last + timedelta(seconds=30))]:  # fmt: skip
        r.fold(seq, at, subject(e), protocol.encode(e))
    assert r.records["a"].offline_reason is protocol.OfflineReason.EXPIRED
    r.fold(4, last + timedelta(seconds=60), "worker.heartbeat.a", protocol.encode(heartbeat("a")))
    assert r.records["a"].live  # the same incarnation revives it within the retention
    r.fold(5, last + timedelta(seconds=90), "worker.expired.a",
           protocol.encode(expired("a", last + timedelta(seconds=60), 15.0)))  # fmt: skip
    r.fold(6, last + timedelta(seconds=500), "worker.heartbeat.a",
           protocol.encode(heartbeat("a")))  # fmt: skip
    assert "a" not in r.records  # purged at +190s: the beat is of a worker that never registered


# ---------------------------------------------------------------- reach


RECORDS = {w: make_info(w) for w in ("a", "b", "c")}


def test_subjects_under_the_limit_lost_nothing() -> None:
    counts = {"worker.register.a": 1, "worker.heartbeat.a": 99, "worker.register.b": 3}
    assert reach(RECORDS, set(counts), counts, 100) == ({}, [])


def test_a_full_subject_seen_before_the_moment_is_trimmed_after_it_incomplete() -> None:
    counts = {"worker.register.a": 1, "worker.heartbeat.a": 100,
              "worker.register.b": 1, "worker.heartbeat.b": 100, "worker.late.b": 100}  # fmt: skip
    seen = {"worker.register.a", "worker.heartbeat.a", "worker.register.b", "worker.late.b"}
    out, unknown = reach(RECORDS, seen, counts, 100)
    assert out == {"a": Reach(trimmed=["heartbeat"]),
                   "b": Reach(trimmed=["late"], missing=["heartbeat"])}  # fmt: skip
    assert (out["a"].state, out["b"].state, unknown) == ("trimmed", "incomplete", [])


def test_a_worker_whose_registrations_are_all_later_and_trimmed_is_unknown() -> None:
    counts = {"worker.register.z": 100, "worker.heartbeat.z": 100, "worker.register.y": 100,
              "worker.register.n": 1}  # fmt: skip
    seen = {"worker.register.y", "worker.heartbeat.z"}  # y: a registration then, refused
    assert reach({}, seen, counts, 100) == ({}, ["z"])


def test_no_limit_no_trimming() -> None:
    assert reach(RECORDS, set(), {"worker.heartbeat.a": 10**6}, 0) == ({}, [])


# ---------------------------------------------------------------- moments


NOW = datetime(2026, 12, 7, 15, 0, 30, tzinfo=UTC)
CET = timezone(timedelta(hours=1))


def test_at_takes_an_age_and_rfc_3339() -> None:
    assert timeparse.parse_at("10m", NOW) == NOW - timedelta(minutes=10)
    assert timeparse.parse_at("2026-12-07T14:05:00+01:00", NOW) == datetime(
        2026, 12, 7, 13, 5, tzinfo=UTC
    )


def test_at_takes_a_time_of_day_in_the_local_zone_the_latest_one_past() -> None:
    assert timeparse.parse_at("15:05", NOW, CET) == datetime(2026, 12, 7, 14, 5, tzinfo=UTC)
    assert timeparse.parse_at("16:30:10", NOW, CET) == datetime(2026, 12, 6, 15, 30, 10, tzinfo=UTC)


def test_at_refuses_the_future_and_nonsense_in_one_line() -> None:
    with pytest.raises(timeparse.TimeParseError, match="is in the future"):
        timeparse.parse_at("2026-12-07T15:01:00Z", NOW)
    with pytest.raises(timeparse.TimeParseError, match=r"or a time of day \(14:05\)$"):
        timeparse.parse_at("yesterday", NOW, CET)
    with pytest.raises(timeparse.TimeParseError, match="invalid time"):
        timeparse.parse_at("14:05", NOW)  # without a local zone (the service): not a moment
