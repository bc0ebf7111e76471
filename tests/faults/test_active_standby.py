"""Two registries against one NATS: one active, one standing by, and the faults between them.

- a second registry stands by without touching the active one's consumer, answers
  from the bucket, and takes over when the first stops (lease released: at once);
- kill -9 of the active one, again and again under 1,000 events/s: the standby
  takes over within seconds each time, nothing acknowledged is lost or applied
  twice, nobody is falsely expired, the bucket equals a replay;
- the active one paused (SIGSTOP) past its lease and woken: it notices before it
  writes, stands by, and what it had sent before the pause changes nothing.

The registries run as child processes (`registry up --nats URL --instance NAME`),
except in the first test; the fleet is tests/faults/helpers.RawFleet, whose
ledgers are the oracle. bench/soak.py runs the long versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import time
from pathlib import Path

from nats.aio.client import Client

from registry.server.embedded import NatsServer
from registry.server.provision import api as js_api
from registry.server.provision import provision
from tests.conftest import eventually
from tests.faults.helpers import (
    RawFleet,
    exactly_once,
    holder_change,
    late_notices,
    lease_holder,
    replay,
    without,
)
from tests.integration.registry_helpers import (
    CONSUMER,
    EVENTS,
    RegistryProcess,
    bounded,
    bucket_records,
    expired_events,
    new_incarnation,
    publish,
    register_body,
    running_registry,
)

WORKERS = 200
RATE_HZ = 5.0  # 1,000 events a second
DECLARED_INTERVAL_S = 2.0  # a 6 s timeout: only a registry that loses beats expires anyone
KILLING_S = float(os.environ.get("FAULTS_HA_SECONDS", "20"))
MIN_KILLS = 4
TAKEOVER_BOUND_S = 10.0  # each one; 3 s TTL + 0.25 s poll, with a busy machine's slack
SEED = 11


async def _consumer_created(nc: Client) -> str:
    info = await js_api(nc, f"CONSUMER.INFO.{EVENTS}.{CONSUMER}")
    return str(info["created"])


# ---------------------------------------------------------------- in-process: standing by


@bounded(60)
async def test_a_second_registry_stands_by_answers_from_the_bucket_and_takes_over(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with contextlib.AsyncExitStack() as first_stack:
        a = await first_stack.enter_async_context(
            running_registry(nats_server.url, caught_up=True, instance="reg-a")
        )
        created = await _consumer_created(nc)
        async with running_registry(nats_server.url, instance="reg-b") as b:
            for i in range(3):
                wid = f"w{i}"
                await publish(js, "register", wid, register_body(wid, new_incarnation()))
            await eventually(lambda: len(a.records()) == 3)
            await eventually(lambda: len(b.records()) == 3)  # b follows the bucket
            assert b.catalog().stats() == a.catalog().stats()
            await asyncio.sleep(2.0)  # several of b's looks at the lease, a's renewals
            assert await _consumer_created(nc) == created  # b never touched it
            assert a.counters()["resyncs"] == 0 and a.active and not b.active
            assert b.lease()["role"] == "standby" and a.lease()["role"] == "active"
            assert b.lease()["active"]["holder"] == "reg-a"  # type: ignore[index]
            epoch_a = a.counters()["lease_epoch"]
            # the micro service spreads requests over both: every answer names the active one
            for _ in range(8):
                answer = json.loads((await nc.request("registry.stats", b"{}", timeout=5)).data)
                assert answer["registry"]["active"]["holder"] == "reg-a"
                assert answer["total"] == 3
            assert await lease_holder(js) == ("reg-a", epoch_a)

            t0 = time.monotonic()
            await first_stack.aclose()  # a stops cleanly: it gives the lease up
            await eventually(lambda: b.active, timeout=10.0, interval=0.02)
            handover_s = time.monotonic() - t0
            await asyncio.wait_for(b.link.wait_caught_up(), 10.0)
            assert b.counters()["lease_epoch"] > epoch_a
            assert {w: r.event_seq for w, r in b.records().items()} == {
                w: r.event_seq for w, r in a.records().items()
            }
            assert await _consumer_created(nc) != created  # b made it again at the checkpoint
            await publish(js, "register", "w9", register_body("w9", new_incarnation()))
            await eventually(lambda: "w9" in b.records())
    assert handover_s < 3.0  # the TTL (3 s) was not waited out


# ---------------------------------------------------------------- processes: kill -9, SIGTERM, SIGSTOP


class Pair:
    """Registry processes named reg-0, reg-1, ...; the one holding the lease is `active`."""

    def __init__(self, url: str, logs: Path, *extra: str) -> None:
        self.url, self.logs, self.extra = url, logs, extra
        self.procs: dict[str, RegistryProcess] = {}
        self.started = 0

    async def start(self) -> RegistryProcess:
        name = f"reg-{self.started}"
        self.started += 1
        args = ["--nats", self.url, "--instance", name, "--log-level", "info", *self.extra]
        proc = await RegistryProcess(args, self.logs / f"{name}.log").start()
        self.procs[name] = proc
        await proc.first_line(timeout=30.0)
        return proc

    async def close(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                if proc.proc is not None and proc.proc.returncode is None:
                    proc.proc.send_signal(signal.SIGCONT)
            await proc.close()


async def _settle_and_check(url: str, nc: Client, fleet: RawFleet, pair: Pair) -> None:
    """Every acknowledged event folded once, nobody expired, the bucket is a replay
    (rebuilt by a registry of the test's own, once every process has stopped)."""
    js = nc.jetstream()

    async def all_folded() -> bool:
        records = await bucket_records(js)
        return all(records.get(w, {}).get("event_seq") == led.last_seq
                   for w, led in fleet.ledgers.items())  # fmt: skip

    await eventually(all_folded, timeout=20.0, interval=0.1)
    held = await lease_holder(js)
    assert held is not None
    for name in sorted(pair.procs, key=lambda n: n == held[0]):  # the standbys, then the active
        assert await pair.procs.pop(name).terminate() == 0
    records = await bucket_records(js)
    verdict = exactly_once(records, fleet, await late_notices(js))
    assert not verdict.lost, f"{len(verdict.lost)} lost, e.g. {next(iter(verdict.lost.items()))}"
    assert not verdict.doubled, f"{len(verdict.doubled)} doubled: {next(iter(verdict.doubled.items()))}"
    assert await expired_events(js) == 0
    rebuilt = await replay(url, js, records, timeout_s=40.0)
    assert without(rebuilt, "version") == without(records, "version")


@bounded(KILLING_S + 150)
async def test_kill9_of_the_active_registry_again_and_again_the_standby_takes_over(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await provision(nc)
    rng = random.Random(SEED)
    fleet = RawFleet(js, WORKERS, rate_hz=RATE_HZ, declared_interval_s=DECLARED_INTERVAL_S)
    pair = Pair(nats_server.url, tmp_path)
    takeovers: list[float] = []
    try:
        await pair.start()
        await pair.start()
        await fleet.register_all()
        async with fleet.beating():
            stop_at = time.monotonic() + KILLING_S
            while time.monotonic() < stop_at or len(takeovers) < MIN_KILLS:
                await asyncio.sleep(rng.uniform(4.0, 7.0))
                held = await lease_holder(js)
                assert held is not None, "nobody holds the lease"
                active = pair.procs.pop(held[0])
                t0 = time.monotonic()
                await active.kill9()
                await pair.start()  # a new standby at once, as a supervisor would
                new = await holder_change(js, held[0], timeout_s=30.0)
                takeovers.append(time.monotonic() - t0)
                assert new[1] > held[1]  # a new epoch
            await asyncio.sleep(3.0)
        await _settle_and_check(nats_server.url, nc, fleet, pair)
    finally:
        await pair.close()
    print(f"takeovers after kill -9 (s): {sorted(round(t, 2) for t in takeovers)}, "
          f"median {statistics.median(takeovers):.2f}")  # fmt: skip
    assert max(takeovers) <= TAKEOVER_BOUND_S, takeovers


@bounded(90)
async def test_sigterm_of_the_active_hands_over_without_waiting_for_the_ttl(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    pair = Pair(nats_server.url, tmp_path, "--lease-ttl", "20")
    try:
        first = await pair.start()
        await eventually(lambda: lease_holder(js), timeout=15.0)
        await pair.start()
        held = await lease_holder(js)
        assert held is not None and held[0] == "reg-0"
        t0 = time.monotonic()
        assert await first.terminate() == 0
        new = await holder_change(js, "reg-0", timeout_s=15.0)
        handover_s = time.monotonic() - t0
        assert new[0] == "reg-1" and new[1] > held[1]
    finally:
        await pair.close()
    assert handover_s < 10.0  # not the 20 s TTL: the lease was given up


@bounded(150)
async def test_a_paused_active_registry_stops_writing_when_it_wakes(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await provision(nc)
    fleet = RawFleet(js, WORKERS, rate_hz=RATE_HZ, declared_interval_s=DECLARED_INTERVAL_S)
    pair = Pair(nats_server.url, tmp_path)
    try:
        paused = await pair.start()
        await eventually(lambda: lease_holder(js), timeout=15.0)
        await pair.start()
        await fleet.register_all()
        async with fleet.beating():
            await asyncio.sleep(3.0)
            assert paused.proc is not None
            paused.proc.send_signal(signal.SIGSTOP)  # mid-batch, writes in flight
            new = await holder_change(js, "reg-0", timeout_s=30.0)
            assert new[0] == "reg-1"
            await asyncio.sleep(4.0)  # reg-1 folds, writes, recreates the consumer
            created = await _consumer_created(nc)
            paused.proc.send_signal(signal.SIGCONT)
            await eventually(lambda: _logged(paused, "registry_lost_lease"), timeout=15.0)
            await asyncio.sleep(4.0)  # it would have resynced (and taken the consumer) by now
            assert await _consumer_created(nc) == created
            assert await lease_holder(js) == new
        assert not _logged(pair.procs["reg-1"], "registry_lost_lease")
        await _settle_and_check(nats_server.url, nc, fleet, pair)
    finally:
        await pair.close()


def _logged(proc: RegistryProcess, event: str) -> bool:
    return any(e.get("event") == event for e in proc.log_events())
