"""A heartbeat racing the sweeper's verdict, 1,000 times.

50 workers run 20 trials each, concurrently: a heartbeat published within
+-50 ms of the worker's deadline (its last stored heartbeat + its timeout), then
a final heartbeat. The sweeper's expiry and the racing heartbeat land in either
order; whatever the order:

- an expiry stored after a heartbeat newer than the one it judged is ignored
  (the worker beat in time, so it was never dead);
- an expiry is never stored before the deadline of the heartbeat it judged;
- an ignored expiry always had such a reason (no immortal worker);
- after the final heartbeat lands, the worker is live.

The outcome of every event is observed by wrapping the projector's fold
(`evolve`, which still does the work); the stream says what was stored when.
1,500 other workers with an hour's interval stand by: they are the healthy
majority a real fleet has, so the mass-expiry brake stays out of the way of a
test about single verdicts.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from registry import fold
from registry.server import projector
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.faults.helpers import StoredMsg, stream_messages
from tests.integration.registry_helpers import (
    bounded,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
    running_registry,
)

# 50 x 20 rather than 100 x 10: the sweeper publishes its verdicts one at a
# time, so with 100 deadlines a second per 50 workers it falls ~0.3 s behind on
# two cores and every racing heartbeat wins; the race would then be run one way.
WORKERS = 50
ROUNDS = 20
INTERVAL_S = 0.1
FLOOR_S = 0.3
TIMEOUT_S = max(FLOOR_S, 3 * INTERVAL_S)  # 0.3 s
SPREAD_S = 0.05
STANDBY = 1500
SEED = 6


@dataclass
class Outcomes:
    """seq -> the fold's first verdict on it (a redelivery would add Duplicate)."""

    by_seq: dict[int, str] = field(default_factory=dict)
    live_after: dict[int, bool] = field(default_factory=dict)  # of applied events

    def wrap(self, evolve: Any) -> Any:
        def spy(record: Any, event: Any, seq: int, stored_at: datetime) -> Any:
            outcome = evolve(record, event, seq, stored_at)
            if not isinstance(outcome, fold.Duplicate) and seq not in self.by_seq:
                self.by_seq[seq] = type(outcome).__name__
                if isinstance(outcome, fold.Applied):
                    self.live_after[seq] = outcome.record.live
            return outcome

        return spy


@pytest.fixture
def outcomes() -> Iterator[Outcomes]:
    seen = Outcomes()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(projector, "evolve", seen.wrap(fold.evolve))
        yield seen


async def _standby(js: JetStreamContext) -> None:
    acks = []
    for i in range(STANDBY):
        wid = f"standby-{i:04d}"
        body = register_body(wid, new_incarnation(), heartbeat_interval_s=3600.0)
        acks.append(await js.publish_async(f"worker.register.{wid}", json.dumps(body).encode()))
    await asyncio.wait_for(asyncio.gather(*acks), 30.0)


async def _sleep_until(wall: float) -> None:
    await asyncio.sleep(max(0.0, wall - time.time()))


async def _trials(js: JetStreamContext, wid: str, rng: random.Random) -> list[int]:
    """ROUNDS trials for one worker; the stream sequences of its final heartbeats.

    The deadline is aimed at from the moment the previous heartbeat's PubAck
    came back (the stream stored it just before); the offsets actually reached
    are measured afterwards from the stored times.
    """
    inc, n, finals = new_incarnation(), 0, []
    await publish(js, "register", wid, register_body(wid, inc, heartbeat_interval_s=INTERVAL_S))
    stored_at = time.time()
    for _ in range(ROUNDS):
        await _sleep_until(stored_at + TIMEOUT_S + rng.uniform(-SPREAD_S, SPREAD_S))
        n += 1
        await publish(js, "heartbeat", wid, heartbeat_body(wid, inc, completed_tasks=n))  # the race
        await asyncio.sleep(0.03)
        n += 1
        final = await publish(js, "heartbeat", wid, heartbeat_body(wid, inc, completed_tasks=n))
        stored_at = time.time()
        finals.append(final.seq)
    return finals


@dataclass
class Audit:
    """The racing workers' history, judged expiry by expiry."""

    offsets: list[float] = field(default_factory=list)  # racing beat - deadline
    applied: int = 0
    ignored: int = 0
    wrongly_applied: list[int] = field(default_factory=list)
    wrongly_ignored: list[int] = field(default_factory=list)
    early: list[int] = field(default_factory=list)
    other: list[tuple[int, str]] = field(default_factory=list)


def _audit(history: list[StoredMsg], outcomes: Outcomes, audit: Audit) -> None:
    """One worker's events in stream order."""
    last_beat: datetime | None = None
    live = False
    for m in history:
        verdict = outcomes.by_seq.get(m.seq, "unseen")
        if m.kind in ("register", "heartbeat"):
            if last_beat is not None and m.kind == "heartbeat" and m.json()["metrics"]["completed_tasks"] % 2:
                audit.offsets.append((m.time - last_beat).total_seconds() - TIMEOUT_S)
            if verdict != "Applied":
                audit.other.append((m.seq, f"{m.kind}: {verdict}"))
            last_beat, live = m.time, True
        elif m.kind == "expired":
            judged = datetime.fromisoformat(m.json()["last_heartbeat"])
            if (m.time - judged).total_seconds() < TIMEOUT_S:
                audit.early.append(m.seq)
            stale = last_beat is None or last_beat > judged
            if verdict == "Applied":
                audit.applied += 1
                if stale or not live:
                    audit.wrongly_applied.append(m.seq)
                live = False
            else:
                audit.ignored += 1
                if live and not stale:
                    audit.wrongly_ignored.append(m.seq)


async def _histories(js: JetStreamContext, workers: list[str]) -> dict[str, list[StoredMsg]]:
    by_worker: dict[str, list[StoredMsg]] = {w: [] for w in workers}
    for m in await stream_messages(js):
        if m.worker_id in by_worker:
            by_worker[m.worker_id].append(m)
    return by_worker


def _silent_for(history: list[StoredMsg]) -> float:
    """From the last heartbeat to the expiry after it (inf if none)."""
    beats = [m for m in history if m.kind == "heartbeat"]
    after = [m for m in history if m.kind == "expired" and m.seq > beats[-1].seq]
    return (after[0].time - beats[-1].time).total_seconds() if after else float("inf")


async def _expired_after_last_beat(js: JetStreamContext, workers: list[str]) -> bool:
    histories = await _histories(js, workers)
    return all(_silent_for(h) < float("inf") for h in histories.values())


@bounded(90)
async def test_heartbeat_racing_the_deadline_never_leaves_a_live_worker_expired(
    nats_server: NatsServer, nc: Client, outcomes: Outcomes
) -> None:
    js = nc.jetstream()
    await provision(nc)
    rng = random.Random(SEED)
    racers = [f"racer-{i:03d}" for i in range(WORKERS)]
    async with running_registry(nats_server.url, caught_up=True, timeout_floor_s=FLOOR_S):
        await _standby(js)
        finals = await asyncio.gather(
            *(_trials(js, wid, random.Random(rng.random())) for wid in racers)
        )
        # then they all go silent: each one is still expired
        await eventually(lambda: _expired_after_last_beat(js, racers), timeout=TIMEOUT_S + 5.0)
    by_worker = await _histories(js, racers)
    audit = Audit()
    for msgs in by_worker.values():
        _audit(msgs, outcomes, audit)
    silent_for = [_silent_for(msgs) for msgs in by_worker.values()]

    assert all(outcomes.live_after.get(seq) for seqs in finals for seq in seqs), (
        "a worker was not live after its final heartbeat"
    )
    assert max(silent_for) <= TIMEOUT_S + 1.0, "a silent worker was expired late"
    assert not audit.wrongly_applied, f"expiries applied despite a newer heartbeat: {audit.wrongly_applied[:5]}"
    assert not audit.wrongly_ignored, f"expiries of a silent worker ignored: {audit.wrongly_ignored[:5]}"
    assert not audit.early, f"expiries stored before the deadline: {audit.early[:5]}"
    assert not audit.other, audit.other[:5]
    # the race really was run, both ways
    assert len(audit.offsets) == WORKERS * ROUNDS
    before = sum(1 for o in audit.offsets if o < 0)
    assert before >= 0.25 * len(audit.offsets) and len(audit.offsets) - before >= 0.25 * len(audit.offsets)
    assert sum(1 for o in audit.offsets if abs(o) <= SPREAD_S + 0.02) >= 0.8 * len(audit.offsets)
    # ... the expiry was stored first (and applied) in some trials, and in some
    # the heartbeat slipped in between the sweeper's verdict and its expiry
    assert audit.applied - WORKERS >= 0.05 * WORKERS * ROUNDS, "the expiry never won the race"
    assert audit.ignored >= 5, "no heartbeat overtook a published expiry"
