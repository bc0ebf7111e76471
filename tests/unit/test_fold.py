"""The pure fold: rules of DESIGN, and replay/redelivery convergence (Hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from registry.fold import (
    PREMATURE,
    Applied,
    Duplicate,
    Ignored,
    Outcome,
    Premature,
    Unregistered,
    availability,
    draining,
    evolve,
)
from registry.protocol import (
    MIN_LATE_FACTOR,
    MIN_TIMEOUT_FACTOR,
    CordonEvent,
    DrainEvent,
    Event,
    ExpiredEvent,
    HardwareInfo,
    HeartbeatEvent,
    LateEvent,
    OfflineReason,
    RegisterEvent,
    UncordonEvent,
    UnregisterEvent,
    WorkerCapability,
    WorkerInfo,
    WorkerLocation,
    WorkerMetrics,
    WorkerRegistration,
    WorkerStatus,
)

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
WID = "w1"
INTERVAL = 0.25  # events in these tests are stored a second apart: four intervals
TIMEOUT = 1.0  # what expire() claims (the sweeper's default would be 3 intervals)
LATE = 0.5  # what late() claims


def at(i: int) -> datetime:
    return T0 + timedelta(seconds=i)


def register(inc: str = "a", max_tasks: int = 2) -> RegisterEvent:
    reg = WorkerRegistration(
        worker_id=WID, name="box", capability=WorkerCapability.GPU,
        hardware=HardwareInfo(cpu_cores=8, memory_gb=16.0),
        location=WorkerLocation(hostname="h", ip_address="127.0.0.1"),
        max_concurrent_tasks=max_tasks, supported_content_types=["audio"],
    )  # fmt: skip
    return RegisterEvent(
        worker_id=WID, incarnation=inc, sent_at=T0, registration=reg,
        heartbeat_interval_s=INTERVAL,
    )  # fmt: skip


def beat(inc: str = "a", status: WorkerStatus = WorkerStatus.ONLINE, active: int = 0, done: int = 0) -> HeartbeatEvent:
    metrics = WorkerMetrics(
        cpu_usage_percent=10.0, memory_usage_percent=20.0, active_tasks=active, completed_tasks=done
    )
    return HeartbeatEvent(worker_id=WID, incarnation=inc, sent_at=T0, status=status, metrics=metrics)


def leave(inc: str = "a") -> UnregisterEvent:
    return UnregisterEvent(worker_id=WID, incarnation=inc, sent_at=T0, reason="shutdown")


def expire(last: datetime, timeout_s: float = TIMEOUT) -> ExpiredEvent:
    return ExpiredEvent(worker_id=WID, last_heartbeat=last, timeout_s=timeout_s, detected_at=last)


def late(last: datetime, late_after_s: float = LATE) -> LateEvent:
    return LateEvent(worker_id=WID, last_heartbeat=last, late_after_s=late_after_s,
                     detected_at=last)  # fmt: skip


def cordon(by: str = "alice", reason: str = "disk") -> CordonEvent:
    return CordonEvent(worker_id=WID, by=by, reason=reason, sent_at=T0)


def drain(by: str = "bob") -> DrainEvent:
    return DrainEvent(worker_id=WID, by=by, reason="update", sent_at=T0)


def uncordon() -> UncordonEvent:
    return UncordonEvent(worker_id=WID, by="carol", sent_at=T0)


def run(events: list[Event], start: int = 1) -> tuple[WorkerInfo | None, list[Outcome]]:
    record: WorkerInfo | None = None
    outcomes: list[Outcome] = []
    for i, e in enumerate(events, start=start):
        out = evolve(record, e, i, at(i))
        outcomes.append(out)
        if isinstance(out, Applied):
            record = out.record
    return record, outcomes


def test_registration_is_online_available_with_zeroed_metrics() -> None:
    rec, _ = run([register()])
    assert rec is not None
    assert rec.status is WorkerStatus.ONLINE and rec.available
    assert rec.metrics.active_tasks == 0 and rec.metrics.cpu_usage_percent == 0.0
    assert rec.registered_at == rec.last_heartbeat == at(1)
    assert rec.event_seq == 1 and rec.incarnation == "a" and rec.offline_reason is None


def test_heartbeat_carries_status_metrics_and_stored_time() -> None:
    rec, _ = run([register(), beat(status=WorkerStatus.BUSY, done=5)])
    assert rec is not None
    assert rec.status is WorkerStatus.BUSY and not rec.available
    assert rec.metrics.completed_tasks == 5
    assert rec.last_heartbeat == at(2) and rec.event_seq == 2 and rec.version == 2


def test_full_worker_is_not_available() -> None:
    rec, _ = run([register(max_tasks=2), beat(active=2)])
    assert rec is not None and not rec.available
    assert availability(rec).reason == "full"


def test_unregister_keeps_an_offline_record() -> None:
    rec, _ = run([register(), leave()])
    assert rec is not None
    assert rec.status is WorkerStatus.OFFLINE and not rec.available
    assert rec.offline_reason is OfflineReason.UNREGISTERED and rec.offline_at == at(2)


def test_expiry_applies_only_to_the_judged_heartbeat() -> None:
    rec, outs = run([register(), beat(), expire(at(1))])
    assert isinstance(outs[-1], Ignored)
    assert rec is not None and rec.live
    rec, outs = run([register(), beat(), expire(at(2))])
    assert isinstance(outs[-1], Applied)
    assert rec is not None and rec.offline_reason is OfflineReason.EXPIRED


def test_heartbeat_of_registered_incarnation_revives_expired_worker() -> None:
    rec, _ = run([register(), expire(at(1)), beat()])
    assert rec is not None and rec.live and rec.available and rec.offline_at is None


def test_zombie_incarnation_cannot_touch_restarted_worker() -> None:
    rec, outs = run([register("old"), register("new"), beat("old", active=2), leave("old")])
    assert [type(o) for o in outs[2:]] == [Ignored, Ignored]
    assert rec is not None and rec.live and rec.incarnation == "new" and rec.event_seq == 2


def test_heartbeat_without_registration_asks_for_one() -> None:
    _, outs = run([beat()])
    assert isinstance(outs[0], Unregistered)
    _, outs = run([register(), leave(), beat()])
    assert isinstance(outs[-1], Unregistered)
    _, outs = run([register("old"), expire(at(1)), beat("new")])
    assert isinstance(outs[-1], Unregistered)


def test_events_at_or_below_event_seq_are_duplicates() -> None:
    rec, _ = run([register(), beat()])
    assert rec is not None
    assert isinstance(evolve(rec, beat(done=99), 2, at(2)), Duplicate)
    assert isinstance(evolve(rec, register(), 1, at(1)), Duplicate)


def test_same_incarnation_reregistration_keeps_its_history() -> None:
    rec, _ = run([register(), beat(done=7), register()])
    assert rec is not None
    assert rec.registered_at == at(1) and rec.metrics.completed_tasks == 7


def test_late_worker_is_unavailable_until_its_next_heartbeat() -> None:
    rec, _ = run([register(), beat(), late(at(2))])
    assert rec is not None and rec.late and not rec.available and rec.live
    assert availability(rec).reason == "late"
    rec, _ = run([register(), beat(), late(at(2)), beat()])
    assert rec is not None and not rec.late and rec.available


def test_late_notice_for_an_older_heartbeat_is_ignored() -> None:
    rec, outs = run([register(), beat(), late(at(1))])
    assert isinstance(outs[-1], Ignored)
    assert rec is not None and not rec.late and rec.available


def test_late_worker_can_still_expire_and_revive() -> None:
    rec, _ = run([register(), late(at(1)), expire(at(1))])
    assert rec is not None and rec.offline_reason is OfflineReason.EXPIRED and not rec.late
    rec, _ = run([register(), late(at(1)), expire(at(1)), beat()])
    assert rec is not None and rec.live and rec.available


# ---------------------------------------------------------------- verdicts need silence


def _registered() -> WorkerInfo:
    rec, _ = run([register()])
    assert rec is not None and rec.last_heartbeat == at(1)
    return rec


def _after(seconds: float) -> datetime:
    return at(1) + timedelta(seconds=seconds)


def test_expiry_stored_just_before_the_claimed_silence_is_refused() -> None:
    out = evolve(_registered(), expire(at(1), TIMEOUT), 2, _after(TIMEOUT - 1e-6))
    assert isinstance(out, Premature) and out.reason.startswith(PREMATURE)
    assert isinstance(out, Ignored)  # refused like any ignored event: acked, logged, counted


def test_expiry_stored_at_the_claimed_silence_is_applied() -> None:
    out = evolve(_registered(), expire(at(1), TIMEOUT), 2, _after(TIMEOUT))
    assert isinstance(out, Applied) and out.record.offline_reason is OfflineReason.EXPIRED


def test_expiry_claiming_less_than_the_least_timeout_is_refused_however_late() -> None:
    least = MIN_TIMEOUT_FACTOR * INTERVAL
    out = evolve(_registered(), expire(at(1), least * 0.999), 2, _after(3600))
    assert isinstance(out, Premature) and out.reason.startswith(f"{PREMATURE} {least:g}s")
    out = evolve(_registered(), expire(at(1), least), 2, _after(least))
    assert isinstance(out, Applied)


def test_late_notice_stored_just_before_the_claimed_silence_is_refused() -> None:
    out = evolve(_registered(), late(at(1), LATE), 2, _after(LATE - 1e-6))
    assert isinstance(out, Premature) and out.reason.startswith(PREMATURE)
    out = evolve(_registered(), late(at(1), LATE), 2, _after(LATE))
    assert isinstance(out, Applied) and out.record.late and not out.record.available


def test_late_notice_claiming_less_than_the_least_late_is_refused_however_late() -> None:
    least = MIN_LATE_FACTOR * INTERVAL
    out = evolve(_registered(), late(at(1), least * 0.999), 2, _after(3600))
    assert isinstance(out, Premature)
    out = evolve(_registered(), late(at(1), least), 2, _after(least))
    assert isinstance(out, Applied) and out.record.late


def test_forged_verdicts_right_after_a_beat_leave_the_worker_available() -> None:
    """The attack: copy last_heartbeat from the bucket, claim a small timeout, publish."""
    rec, outs = run([register(), beat(), expire(at(2), 0.01), late(at(2), 0.01)])
    assert all(isinstance(o, Premature) for o in outs[2:])
    assert rec is not None and rec.live and rec.available and not rec.late


# ---------------------------------------------------------------- operator actions


def test_a_cordoned_worker_is_unavailable_with_who_when_and_why_and_keeps_its_tasks() -> None:
    rec, _ = run([register(), beat(active=1), cordon()])
    assert rec is not None and rec.live and not rec.available
    assert rec.cordon is not None and (rec.cordon.by, rec.cordon.reason) == ("alice", "disk")
    assert rec.cordon.at == at(3) and rec.cordon.event_seq == 3 and not rec.cordon.drain
    assert availability(rec).reason == "cordoned" and rec.metrics.active_tasks == 1
    rec, _ = run([register(), beat(active=1), cordon(), beat(active=0)])
    assert rec is not None and not rec.available and rec.cordon is not None  # beats don't lift it


def test_a_cordon_outlives_a_restart_and_an_expiry_until_uncordon() -> None:
    rec, _ = run([register("a"), cordon(), leave("a"), register("b"), beat("b")])
    assert rec is not None and rec.live and rec.incarnation == "b"
    assert rec.cordon is not None and not rec.available
    rec, outcomes = run([register(), cordon(), uncordon(), uncordon()])
    assert rec is not None and rec.cordon is None and rec.available
    assert isinstance(outcomes[-1], Ignored) and "not cordoned" in outcomes[-1].reason


def test_a_drain_names_the_live_process_and_a_cordon_cannot_soften_it() -> None:
    rec, outcomes = run([register("a"), drain(), cordon(), drain()])
    assert rec is not None and rec.cordon is not None and rec.cordon.drain
    assert rec.cordon.incarnation == "a" and draining(rec)
    assert availability(rec).reason == "draining"
    assert [type(o) for o in outcomes[2:]] == [Ignored, Ignored]
    rec, _ = run([register("a"), drain(), leave("a"), register("b")])
    assert rec is not None and rec.cordon is not None and not draining(rec)  # drained; still held
    assert availability(rec).reason == "drained" and not rec.available
    rec, _ = run([register("a"), drain(), uncordon()])
    assert rec is not None and rec.cordon is None and rec.available


def test_operator_actions_on_unknown_workers_are_ignored() -> None:
    for action in (cordon(), drain(), uncordon()):
        assert isinstance(evolve(None, action, 1, at(1)), Ignored)


# ---------------------------------------------------------------- properties

incarnations = st.sampled_from(["a", "b"])
events = st.one_of(
    incarnations.map(register),
    st.builds(beat, incarnations, st.sampled_from(list(WorkerStatus)), st.integers(0, 3), st.integers(0, 9)),
    incarnations.map(leave),
    st.integers(1, 40).map(lambda i: expire(at(i))),
    st.integers(1, 40).map(lambda i: late(at(i))),
    st.sampled_from([cordon(), drain(), uncordon()]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, min_size=1, max_size=40), st.data())
def test_redelivery_from_any_checkpoint_converges(history: list[Event], data: st.DataObject) -> None:
    """A crash re-delivers a suffix from an older checkpoint: same final record."""
    expected, _ = run(history)
    crash = data.draw(st.integers(0, len(history)))
    checkpoint = data.draw(st.integers(0, crash))
    record, _ = run(history[:crash])
    for i, e in enumerate(history[checkpoint:], start=checkpoint + 1):
        out = evolve(record, e, i, at(i))
        if isinstance(out, Applied):
            record = out.record
    assert record == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(events, min_size=1, max_size=40))
def test_each_event_folds_at_most_once(history: list[Event]) -> None:
    """Folding every event twice in a row changes nothing (exactly-once effect)."""
    expected, _ = run(history)
    record: WorkerInfo | None = None
    for i, e in enumerate(history, start=1):
        for _ in range(2):
            out = evolve(record, e, i, at(i))
            if isinstance(out, Applied):
                record = out.record
    assert record == expected
    if record is not None:
        applied = sum(isinstance(o, Applied) for o in run(history)[1])
        assert record.version == applied
