"""The fleet simulator without NATS: schedule, bodies, load, churn, command line."""

from __future__ import annotations

import argparse
import random
from collections import Counter

import pytest

from agent import simulate
from agent.simulate import (
    ALIVE,
    DEAD,
    DOWN,
    Fleet,
    Schedule,
    SimSettings,
    SimWorker,
    UsageError,
    sent_at_now,
)
from registry.protocol import (
    DEFAULT_CONTENT_TYPES,
    RegisterEvent,
    UnregisterEvent,
    decode_event,
)

# ---------------------------------------------------------------- schedule


def test_every_worker_beats_once_per_interval() -> None:
    s = Schedule(order=range(1000), interval_s=5.0, start=0.0)
    beats = [i for t in range(1, 501) for i in s.due(t * 0.01)]
    assert sorted(beats) == list(range(1000))


def test_beats_are_spread_evenly_over_the_interval() -> None:
    s = Schedule(order=range(10_000), interval_s=5.0, start=0.0)
    per_tick = [len(s.due(t * 0.01)) for t in range(1, 501)]
    assert min(per_tick) >= 19 and max(per_tick) <= 21  # 10,000 / 500 ticks


def test_nothing_is_due_before_the_start() -> None:
    s = Schedule(order=range(10), interval_s=1.0, start=100.0)
    assert s.due(99.0) == []


def test_after_a_long_stall_each_worker_beats_once_not_once_per_missed_interval() -> None:
    s = Schedule(order=range(100), interval_s=1.0, start=0.0)
    assert len(s.due(0.5)) == 50
    late = s.due(10.0)  # nine intervals late
    assert Counter(late).most_common(1)[0][1] == 1
    assert len(late) == 100


def test_slots_follow_the_given_order() -> None:
    s = Schedule(order=[3, 1, 2, 0], interval_s=4.0, start=0.0)
    assert s.due(4.0) == [3, 1, 2, 0]
    assert s.due(5.0) == [3]


def test_lag_is_how_late_the_oldest_pending_beat_is() -> None:
    s = Schedule(order=range(10), interval_s=1.0, start=0.0)
    s.due(0.55)
    assert s.lag(0.55) == pytest.approx(0.0)
    assert s.lag(0.9) == pytest.approx(0.3)


# ---------------------------------------------------------------- bodies


def _worker(seed: int = 1, idx: int = 7) -> SimWorker:
    rng = random.Random(seed)
    profile = rng.choice(simulate.profiles(rng))
    return SimWorker(idx, f"sim-{idx:04d}", profile, rng)


def test_register_body_is_a_valid_registration_with_the_default_content_types() -> None:
    for seed in range(20):
        w = _worker(seed)
        event = decode_event(f"worker.register.{w.worker_id}", w.register_body(5.0))
        assert isinstance(event, RegisterEvent)
        reg = event.registration
        assert event.incarnation == w.incarnation and event.heartbeat_interval_s == 5.0
        assert reg.supported_content_types == list(DEFAULT_CONTENT_TYPES[reg.capability])
        assert reg.hardware.gpu_count == len(reg.hardware.gpus) == len(reg.hardware.gpu_models)
        assert reg.max_concurrent_tasks >= 1


def test_unregister_body_decodes_with_its_reason() -> None:
    w = _worker()
    event = decode_event(f"worker.unregister.{w.worker_id}", w.unregister_body("restart"))
    assert isinstance(event, UnregisterEvent) and event.reason == "restart"


def test_load_wanders_within_max_tasks_and_completed_only_grows() -> None:
    rng = random.Random(5)
    w = _worker()
    seen, completed = set(), 0
    for _ in range(2000):
        w.step(rng)
        assert 0 <= w.active <= w.max_tasks
        assert w.completed >= completed
        completed = w.completed
        seen.add(w.active)
    assert seen == set(range(w.max_tasks + 1))
    assert completed > 100


def test_a_new_life_has_a_new_incarnation_and_counts_from_zero() -> None:
    rng = random.Random(1)
    w = _worker()
    for _ in range(100):
        w.step(rng)
    before = w.incarnation
    w.new_life()
    assert w.incarnation != before and w.completed == 0 and w.active == 0
    assert w.incarnation.encode() in w.heartbeat_body(sent_at_now(), 0.0)


def test_the_fleet_mixes_capabilities() -> None:
    fleet = Fleet(SimSettings(count=1000, seed=1), Recorder())
    share = Counter(str(w.capability) for w in fleet.workers)
    assert set(share) == {"gpu", "cpu", "hybrid"}
    assert 150 < share["hybrid"] < 250 and 400 < share["cpu"] < 600


# ---------------------------------------------------------------- churn and kills


class Recorder:
    """Stands in for the publisher: keeps (subject, body) in order."""

    acked = errors = timeouts = duplicates = retried = 0
    last_error = ""
    in_flight = 0

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, body: bytes) -> None:
        self.sent.append((subject, body))

    async def settle(self, timeout_s: float) -> None:
        pass

    def kinds(self) -> Counter[str]:
        return Counter(s.split(".")[1] for s, _ in self.sent)


async def _run(fleet: Fleet, seconds: float, tick: float = 0.05) -> None:
    await fleet.register_all(0.0)
    t = 0.0
    while t < seconds:
        t += tick
        await fleet.step(t)


async def test_without_churn_a_fleet_only_registers_and_beats() -> None:
    rec = Recorder()
    fleet = Fleet(SimSettings(count=50, heartbeat_interval_s=1.0, seed=1), rec)
    await _run(fleet, 10.0)
    assert rec.kinds() == Counter(register=50, heartbeat=500)


async def test_churn_restarts_some_workers_and_silences_others() -> None:
    rec = Recorder()
    settings = SimSettings(count=200, heartbeat_interval_s=1.0, churn=0.3, seed=2)
    fleet = Fleet(settings, rec)
    await _run(fleet, 60.0)
    r = fleet.report
    # 30% of 200 per minute, for a minute: about 60 (a pick of a worker that is down is skipped)
    assert 35 <= r.restarts + r.silent_deaths <= 65
    assert r.restarts > 10 and r.silent_deaths > 10
    assert rec.kinds()["unregister"] == r.restarts
    incarnations: dict[str, set[str]] = {}
    for subject, body in rec.sent:
        event = decode_event(subject, body)
        incarnations.setdefault(event.worker_id, set()).add(event.incarnation)  # type: ignore[union-attr]
    assert sum(len(v) - 1 for v in incarnations.values()) == rec.kinds()["register"] - 200


async def test_a_silent_worker_stays_quiet_long_enough_to_be_expired() -> None:
    rec = Recorder()
    fleet = Fleet(SimSettings(count=100, heartbeat_interval_s=1.0, churn=0.5, seed=3), rec)
    await fleet.register_all(0.0)
    t, last_beat, gaps = 0.0, {}, []
    while t < 40.0:
        t += 0.05
        before = len(rec.sent)
        await fleet.step(t)
        for subject, _ in rec.sent[before:]:
            kind, wid = subject.split(".")[1:]
            if kind == "register" and wid in last_beat:
                gaps.append(t - last_beat[wid])
            if kind == "heartbeat":
                last_beat[wid] = t
    silent = [g for g in gaps if g > 3.0]
    assert silent and min(silent) >= 4.0  # more than 3 intervals (the default timeout)


async def test_killed_workers_never_beat_again_and_do_not_unregister() -> None:
    rec = Recorder()
    fleet = Fleet(
        SimSettings(count=100, heartbeat_interval_s=0.5, kill=10, kill_within_s=2.0, seed=4), rec
    )
    await _run(fleet, 5.0)
    killed = set(fleet.report.killed)
    assert len(killed) == 10 and all(fleet.by_id[w].state == DEAD for w in killed)
    after = rec.sent[-200:]  # the last two seconds
    assert not killed & {s.split(".")[2] for s, _ in after}
    await fleet.leave()
    assert rec.kinds()["unregister"] == 90


async def test_a_control_register_makes_a_live_worker_register_again() -> None:
    rec = Recorder()
    fleet = Fleet(SimSettings(count=3, heartbeat_interval_s=1.0, seed=1), rec)
    await fleet.register_all(0.0)
    w = fleet.workers[1]
    fleet.on_control(w.worker_id, b'{"v":1,"action":"register","reason":"unknown"}')
    fleet.on_control("someone-else", b'{"v":1,"action":"register"}')
    fleet.on_control(fleet.workers[2].worker_id, b'{"v":1,"action":"reboot"}')
    await fleet.step(0.01)
    subject, body = rec.sent[-1]
    assert subject == f"worker.register.{w.worker_id}"
    assert decode_event(subject, body).incarnation == w.incarnation  # type: ignore[union-attr]
    assert fleet.report.controls == 1


async def test_leaving_unregisters_every_live_worker_once() -> None:
    rec = Recorder()
    fleet = Fleet(SimSettings(count=20, heartbeat_interval_s=1.0, seed=1), rec)
    await fleet.register_all(0.0)
    fleet.workers[0].state = DOWN
    await fleet.leave()
    assert rec.kinds()["unregister"] == 19
    assert all(w.state != ALIVE for w in fleet.workers)


# ---------------------------------------------------------------- command line


def _args(*argv: str) -> argparse.Namespace:
    parser = simulate.cli._Parser()
    simulate.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_become_settings() -> None:
    argv = ["--nats", "nats://h:4222", "--count", "10", "--heartbeat-interval", "0.5",
            "--churn", "0.1", "--duration", "3", "--seed", "9", "--no-unregister"]  # fmt: skip
    s = simulate.settings_from(_args(*argv), environ={})
    assert (s.nats_url, s.count, s.heartbeat_interval_s, s.churn, s.duration_s, s.seed) == (
        "nats://h:4222",
        10,
        0.5,
        0.1,
        3.0,
        9,
    )
    assert s.unregister is False


def test_environment_fills_in_missing_flags() -> None:
    s = simulate.settings_from(_args(), environ={"NATS_URL": "nats://x:1", "SIM_COUNT": "7"})
    assert s.nats_url == "nats://x:1" and s.count == 7


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--count", "0"], "--count"),
        (["--count", "many"], "--count"),
        (["--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["--churn", "-1"], "--churn"),
        (["--duration", "-5"], "--duration"),
        (["--nats", "http://localhost:4222"], "--nats"),
        (["--id-prefix", "a.b"], "--id-prefix"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(argv: list[str], flag: str) -> None:
    with pytest.raises(UsageError, match=f"^invalid {flag} "):
        simulate.settings_from(_args(*argv), environ={})


def test_main_reports_bad_input_in_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate.main(["--count", "-3"]) == 2
    assert simulate.main(["--frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("agent simulate: ") for line in err)


def test_agent_simulate_is_the_agent_commands_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from agent import cli

    assert cli.main(["simulate", "--count", "-3"]) == 2
    assert capsys.readouterr().err.startswith("agent simulate: invalid --count")


async def test_with_a_ramp_each_worker_beats_within_an_interval_of_registering() -> None:
    import asyncio

    class TimedRecorder(Recorder):
        async def publish(self, subject: str, body: bytes) -> None:
            self.sent.append((subject, body))
            self.at.append(asyncio.get_running_loop().time())

    rec = TimedRecorder()
    rec.at = []  # type: ignore[attr-defined]
    s = SimSettings(count=60, heartbeat_interval_s=0.2, ramp_s=0.3, duration_s=0.9, seed=1)
    fleet = Fleet(s, rec)
    await simulate.run._run(fleet, s, asyncio.Event(), asyncio.get_running_loop())
    registered: dict[str, float] = {}
    first_beat: dict[str, float] = {}
    for (subject, _), t in zip(rec.sent, rec.at, strict=True):  # type: ignore[attr-defined]
        kind, wid = subject.split(".")[1:]
        if kind == "register":
            registered[wid] = t
        elif kind == "heartbeat":
            assert wid in registered  # never a beat before the register
            first_beat.setdefault(wid, t)
    assert len(registered) == 60
    assert max(registered.values()) - min(registered.values()) > 0.2  # spread, not a burst
    assert all(first_beat[w] - registered[w] <= 0.2 + 0.05 for w in first_beat)
