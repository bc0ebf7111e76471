"""Soak: the faults of tests/faults/ in rotation, under simulated load, for N minutes.

    .venv/bin/python bench/soak.py --minutes 3

A nats-server (file storage, nats/server.conf) and `registry up --nats URL`
run as processes on 127.0.0.1. The load is a simulated fleet
(agent/simulate/, with churn: restarts and silent deaths) plus a raw fleet
whose every acknowledged event is on a ledger (tests/faults/helpers.RawFleet).
Every `--every` seconds one fault, in rotation:

- registry_kill9: kill -9 the registry, start it again at once;
- nats_restart: restart the nats-server on the same port and store;
- registry_stopped: stop the registry for longer than every worker's timeout;
- heartbeat_race: workers beat within +-50 ms of their deadlines (then a final
  heartbeat: the worker must be live once that is folded).

With `--cluster`, the servers are the 3-node cluster of nats/cluster/ (R3
streams and buckets, every client given all three URLs) and two registries run
active/standby; the faults are then:

- active_kill9: kill -9 the active registry (the lease holder), start a new
  standby at once;
- active_sigstop: pause the active registry past its lease (SIGSTOP), wake it
  once the standby has taken over, and stop it (a supervisor's restart);
- leader_kill9: kill -9 the node leading WORKER_EVENTS, start it again 5 s later;
- node_kill9: the same with a node that leads nothing of ours if there is one;
- heartbeat_race, as above.

A router follows WORKER_AVAILABILITY throughout; after each fault, the time
until it has taken every announcement made by then is recorded (at most 15 s).
Then the load stops and the invariants are checked: the bucket equals a replay
of the stream (every field but `version`, see tests/faults/test_replay_trim.py),
no acknowledged event of the raw fleet is lost or applied twice, and no worker
that kept beating was expired. A summary is printed as JSON and written to
bench/results/soak-<time>.json. Everything runs on 127.0.0.1 and stops by itself.
Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# run by path, Python puts bench/ first on sys.path, where bench/http.py would stand for
# the standard library's http: the repository root takes its place
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p).resolve() != ROOT / "bench")]

import nats  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402

from agent.simulate import SimReport, SimSettings, simulate  # noqa: E402
from registry import logs  # noqa: E402
from registry.router import Router  # noqa: E402
from registry.server.embedded import LocalCluster, NatsServer  # noqa: E402
from registry.server.provision import api as js_api  # noqa: E402
from registry.server.provision import provision  # noqa: E402
from tests.faults.helpers import (  # noqa: E402
    RawFleet,
    StoredMsg,
    exactly_once,
    holder_change,
    lease_holder,
    projector_lag_s,
    replay,
    stream_messages,
    without,
)
from tests.integration.registry_helpers import (  # noqa: E402
    RegistryProcess,
    bucket_records,
    heartbeat_body,
    new_incarnation,
    publish,
    record,
    register_body,
)

RESULTS = ROOT / "bench" / "results"
FAULTS = ("registry_kill9", "nats_restart", "registry_stopped", "heartbeat_race")
CLUSTER_FAULTS = ("active_kill9", "leader_kill9", "active_sigstop", "node_kill9", "heartbeat_race")
NODE_DOWN_S = 5.0
ROUTER_WITHIN_S = 15.0  # a router has every announcement made by then, counted from the fault
FLOOR_S = 1.0
SIM_INTERVAL_S = 1.0  # timeout 3 s, late after 1.5 s
RAW_DECLARED_S = 2.0  # timeout 6 s: the raw fleet beats 4x a second, so it is never silent
RACE_INTERVAL_S = 0.1  # timeout = the floor, 1 s
RACERS, RACE_ROUNDS, RACE_SPREAD_S = 20, 4, 0.05


@dataclass
class Soak:
    args: argparse.Namespace
    server: NatsServer | LocalCluster
    nc: Client
    logs_dir: Path
    registry: RegistryProcess | None = None
    standbys: dict[str, RegistryProcess] = field(default_factory=dict)  # --cluster: by instance
    starts: int = 0
    takeovers_s: list[float] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    race_trials: int = 0
    race_not_live: int = 0
    lag_samples: list[float] = field(default_factory=list)
    recovered_s: dict[str, list[float]] = field(default_factory=dict)
    router: Router | None = None  # follows WORKER_AVAILABILITY through every fault
    router_converged_s: dict[str, list[float]] = field(default_factory=dict)

    @property
    def js(self) -> JetStreamContext:
        return self.nc.jetstream()

    @property
    def clustered(self) -> bool:
        return isinstance(self.server, LocalCluster)

    async def start_registry(self) -> None:
        """Single server: the registry. Cluster: one more registry process (R3, all URLs)."""
        self.starts += 1
        name = f"registry-{self.starts}"
        args = ["--nats", self.server.url, "--timeout-floor", str(FLOOR_S), "--log-level", "warning",
                "--instance", name]  # fmt: skip
        if self.clustered:
            args += ["--replicas", "3"]
        proc = await RegistryProcess(args, self.logs_dir / f"{name}.log").start()
        if self.clustered:
            await proc.first_line(timeout=60.0)
            self.standbys[name] = proc
        else:
            self.registry = proc

    async def stop_registry(self) -> None:
        """Every registry process: the standbys first, then the active one."""
        active = await _quiet(lease_holder(self.js)) if self.clustered else None
        names = sorted(self.standbys, key=lambda n: active is not None and n == active[0])
        for name in names:
            await self.standbys.pop(name).terminate()
        if self.registry is not None:
            await self.registry.terminate()
            self.registry = None

    async def _active(self) -> tuple[str, RegistryProcess]:
        held = await lease_holder(self.js)
        assert held is not None and held[0] in self.standbys, f"lease holder {held} is not ours"
        return held[0], self.standbys[held[0]]

    async def _takeover_from(self, name: str, started: float) -> None:
        await holder_change(self.js, name, timeout_s=60.0)
        self.takeovers_s.append(round(time.monotonic() - started, 2))

    # ------------------------------------------------------------ faults

    async def registry_kill9(self) -> None:
        assert self.registry is not None
        await self.registry.kill9()
        await self.start_registry()

    async def nats_restart(self) -> None:
        assert isinstance(self.server, NatsServer)
        await asyncio.to_thread(self.server.restart)

    async def registry_stopped(self) -> None:
        await self.stop_registry()
        await asyncio.sleep(1.5 * 3 * RAW_DECLARED_S)  # past every worker's timeout
        await self.start_registry()

    async def active_kill9(self) -> None:
        name, proc = await self._active()
        started = time.monotonic()
        await proc.kill9()
        del self.standbys[name]
        await self.start_registry()
        await self._takeover_from(name, started)

    async def active_sigstop(self) -> None:
        name, proc = await self._active()
        assert proc.proc is not None
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGSTOP)
        try:
            await self._takeover_from(name, started)
            await asyncio.sleep(2.0)  # the new active one writes meanwhile
        finally:
            proc.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(2.0)  # awake: it must notice and write nothing
        await self.standbys.pop(name).terminate()
        await self.start_registry()

    async def leader_kill9(self) -> None:
        await self._node_kill9(leader=True)

    async def node_kill9(self) -> None:
        await self._node_kill9(leader=False)

    async def _node_kill9(self, leader: bool) -> None:
        assert isinstance(self.server, LocalCluster)
        info = await self.js.stream_info("WORKER_EVENTS")
        lead = info.cluster.leader if info.cluster else None
        names = [f"n{i + 1}" for i in range(len(self.server.nodes))]
        others = [n for n in names if n != lead]
        victim = lead if leader and lead else random.Random(self.starts).choice(others)
        node = self.server.nodes[int(victim.removeprefix("n")) - 1]
        await asyncio.to_thread(node.kill)
        await asyncio.sleep(NODE_DOWN_S)
        await asyncio.to_thread(node.start)

    async def heartbeat_race(self) -> None:
        n = self.faults["heartbeat_race"]
        rng = random.Random(self.args.seed + n)
        racers = [f"race-{n}-{i:02d}" for i in range(RACERS)]
        results = await asyncio.gather(*(self._race(w, random.Random(rng.random())) for w in racers))
        for live_after in results:
            self.race_trials += len(live_after)
            self.race_not_live += sum(1 for live in live_after if not live)

    async def _race(self, wid: str, rng: random.Random) -> list[bool]:
        """RACE_ROUNDS trials: a beat at the deadline +-50 ms, then a final one."""
        js, inc, n, live_after = self.js, new_incarnation(), 0, []
        timeout = max(FLOOR_S, 3 * RACE_INTERVAL_S)
        await publish(js, "register", wid, register_body(wid, inc, heartbeat_interval_s=RACE_INTERVAL_S))
        stored_at = time.time()
        for _ in range(RACE_ROUNDS):
            await asyncio.sleep(max(0.0, stored_at + timeout + rng.uniform(-RACE_SPREAD_S, RACE_SPREAD_S) - time.time()))
            n += 2
            await publish(js, "heartbeat", wid, heartbeat_body(wid, inc, completed_tasks=n - 1))
            await asyncio.sleep(0.03)
            final = await publish(js, "heartbeat", wid, heartbeat_body(wid, inc, completed_tasks=n))
            stored_at = time.time()
            rec = await _folded(js, wid, final.seq, timeout_s=10.0)
            live_after.append(rec is not None and rec["offline_reason"] is None)
        return live_after

    async def inject(self, kind: str) -> None:
        """One fault; then how long until the projector has folded what was
        stored in the half second after it (bounded): its recovery."""
        started = time.monotonic()
        await getattr(self, kind)()
        self.faults[kind] += 1
        done = time.monotonic()
        await asyncio.sleep(0.5)
        mark = await _quiet(_last_seq(self.nc))
        while mark is not None and time.monotonic() - done < 30.0:
            floor = await _quiet(_ack_floor(self.nc))
            if floor is not None and floor >= mark:
                break
            await asyncio.sleep(0.05)
        recovered = round(time.monotonic() - done, 2)
        self.recovered_s.setdefault(kind, []).append(recovered)
        line = {"fault": kind, "took_s": round(done - started, 2), "folding_caught_up_after_s": recovered}
        if self.router is not None:  # it has taken every announcement made by now
            announced = await _quiet(_last_seq(self.nc, "WORKER_AVAILABILITY"))
            while announced is not None and self.router.last_seq < announced and time.monotonic() - started < 60.0:
                await asyncio.sleep(0.05)
            converged = round(time.monotonic() - started, 2)
            self.router_converged_s.setdefault(kind, []).append(converged)
            line["router_converged_after_s"] = converged
        print(json.dumps(line), file=sys.stderr, flush=True)

    async def monitor(self) -> None:
        while True:
            lag = await _quiet(projector_lag_s(self.nc))
            self.lag_samples.append(float("inf") if lag is None else lag)
            await asyncio.sleep(0.5)


async def _last_seq(nc: Client, stream: str = "WORKER_EVENTS") -> int:
    return int((await js_api(nc, f"STREAM.INFO.{stream}"))["state"]["last_seq"])


async def _ack_floor(nc: Client) -> int | None:
    info = await js_api(nc, "CONSUMER.INFO.WORKER_EVENTS.registry-projector")
    return None if "error" in info else int(info["ack_floor"]["stream_seq"])


async def _ignore(e: Exception) -> None:
    """Connection errors while the server restarts are expected; the client reconnects."""


async def _quiet(coro: Any) -> Any:
    """None instead of an error (the server may be restarting)."""
    try:
        return await asyncio.wait_for(coro, 5.0)
    except Exception:  # noqa: BLE001 - a sample lost to a fault is not news
        return None


async def _folded(js: JetStreamContext, wid: str, seq: int, timeout_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = await _quiet(record(js, wid))
        if rec is not None and rec["last_heartbeat_seq"] >= seq:
            return rec
        await asyncio.sleep(0.02)
    return None


# ---------------------------------------------------------------- the audit


def _sweeps(history: list[StoredMsg]) -> dict[str, Counter[str]]:
    """Late and expired events per worker."""
    out: dict[str, Counter[str]] = {}
    for m in history:
        if m.kind in ("late", "expired"):
            out.setdefault(m.worker_id, Counter())[m.kind] += 1
    return out


def _early_expiries(history: list[StoredMsg]) -> list[int]:
    """Expiries stored before the deadline of the heartbeat they judged."""
    early = []
    for m in history:
        if m.kind == "expired":
            body = m.json()
            judged = datetime.fromisoformat(body["last_heartbeat"])
            if (m.time - judged).total_seconds() < body["timeout_s"] - 0.001:
                early.append(m.seq)
    return early


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _expiry_verdicts(history: list[StoredMsg]) -> tuple[list[int], list[int]]:
    """(stale, revived): expiries that named a heartbeat older than one already
    stored (a wrong verdict, which the fold ignores), and expiries of the last
    heartbeat whose incarnation beat again within its timeout (the worker was
    alive: a false expiry). Racers beat late on purpose and are left out."""
    last: dict[str, tuple[datetime, str]] = {}
    pending: dict[str, tuple[int, datetime, str, float]] = {}
    stale, revived = [], []
    for m in history:
        if m.worker_id.startswith("race-"):
            continue
        if m.kind in ("register", "heartbeat"):
            inc = m.json().get("incarnation", "")
            seq, at, was, timeout = pending.pop(m.worker_id, (0, m.time, "", 0.0))
            if seq and was == inc and (m.time - at).total_seconds() < timeout:
                revived.append(seq)
            last[m.worker_id] = (m.time, inc)
        elif m.kind == "expired" and m.worker_id in last:
            body = m.json()
            beat, inc = last[m.worker_id]
            if _when(body["last_heartbeat"]) < beat:
                stale.append(m.seq)
            else:
                pending[m.worker_id] = (m.seq, m.time, inc, body["timeout_s"])
    return stale, revived


def audit(records: dict[str, dict[str, Any]], fleet: RawFleet, history: list[StoredMsg]) -> dict[str, Any]:
    """Lost / applied twice / falsely expired, for the raw fleet (which never went silent)."""
    verdict = exactly_once(records, fleet)
    sweeps = _sweeps(history)
    false_expired = {w for w in fleet.ledgers if sweeps.get(w, Counter())["expired"]
                     and (records.get(w, {}).get("version", 0) > fleet.ledgers[w].events
                          or records.get(w, {}).get("offline_reason") == "expired")}  # fmt: skip
    late_applied = {w for w in verdict.doubled if w not in false_expired and sweeps.get(w)}
    doubled = set(verdict.doubled) - false_expired - late_applied
    stale, revived = _expiry_verdicts(history)
    early = _early_expiries(history)
    return {
        "lost": len(verdict.lost),
        "double_applied": len(doubled),
        "false_expiries": len(false_expired) + len(early) + len(set(revived) - set(early)),
        "false_expiries_by_kind": {"raw_fleet_expired": len(false_expired), "before_deadline": len(early),
                                   "alive_again_within_timeout": len(revived)},
        "wrong_expiry_verdicts_ignored_by_the_fold": len(stale),
        "late_notices_applied_to_beating_workers": len(late_applied),
        "expiry_events_for_beating_workers": sum(sweeps.get(w, Counter())["expired"] for w in fleet.ledgers),
        "examples": {
            "lost": dict(list(verdict.lost.items())[:3]),
            "doubled": {w: verdict.doubled[w] for w in list(doubled)[:3]},
            "falsely_expired": sorted(false_expired)[:3],
        },
    }


# ---------------------------------------------------------------- the run


async def _load(soak: Soak, fleet: RawFleet, stop: asyncio.Event) -> asyncio.Task[SimReport]:
    sim = SimSettings(nats_url=soak.server.url, count=soak.args.workers, heartbeat_interval_s=SIM_INTERVAL_S,
                      churn=soak.args.churn, seed=soak.args.seed, id_prefix="sim", stop_timeout_s=10.0)  # fmt: skip
    await fleet.register_all()
    return asyncio.create_task(simulate(sim, stop))


async def _rotate(soak: Soak, until: float) -> None:
    kinds = list(CLUSTER_FAULTS if soak.clustered else FAULTS)
    random.Random(soak.args.seed).shuffle(kinds)
    i = 0
    while time.monotonic() + soak.args.every < until:
        await asyncio.sleep(soak.args.every)
        await soak.inject(kinds[i % len(kinds)])
        i += 1


async def _wind_down(stop: asyncio.Event, sim: asyncio.Task[SimReport]) -> SimReport:
    """Stop the simulated fleet (its workers unregister)."""
    stop.set()
    return await asyncio.wait_for(sim, 30.0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    server: NatsServer | LocalCluster = LocalCluster(tmp / "cluster") if args.cluster else NatsServer(tmp / "nats")
    await asyncio.to_thread(server.start)
    urls = server.urls if isinstance(server, LocalCluster) else [server.url]
    nc = await nats.connect(servers=urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
                            error_cb=_ignore)  # fmt: skip
    soak = Soak(args, server, nc, tmp)
    started = time.monotonic()
    try:
        await _provision(nc, 3 if args.cluster else 1)
        await soak.start_registry()
        if args.cluster:
            await soak.start_registry()  # the standby
        else:
            await soak.registry.first_line()  # type: ignore[union-attr]
        fleet = RawFleet(soak.js, args.raw, rate_hz=4.0, declared_interval_s=RAW_DECLARED_S)
        stop = asyncio.Event()
        sim = await _load(soak, fleet, stop)
        monitor = asyncio.create_task(soak.monitor())
        soak.router = await Router.connect(server.url)
        async with fleet.beating(settle_s=30.0):
            await _rotate(soak, started + args.minutes * 60.0)
            report = await _wind_down(stop, sim)
        # the raw fleet has stopped: stop the registry once it has folded everything,
        # before anyone is announced late (3 s)
        await _caught_up(soak.js, fleet)
        await soak.stop_registry()
        monitor.cancel()
        return await _check(soak, fleet, report, time.monotonic() - started)
    finally:
        if soak.router is not None:
            await soak.router.close()
        for proc in [soak.registry, *soak.standbys.values()]:
            if proc is not None:
                await proc.close()
        await nc.close()
        await asyncio.to_thread(server.stop)


async def _provision(nc: Client, replicas: int, timeout_s: float = 60.0) -> None:
    """Right after a cluster starts, R3 streams wait for a meta leader: ask again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await provision(nc, replicas=replicas)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _caught_up(js: JetStreamContext, fleet: RawFleet, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = await bucket_records(js)
        if all(records.get(w, {}).get("event_seq") == led.last_seq for w, led in fleet.ledgers.items()):
            return
        await asyncio.sleep(0.05)


async def _check(soak: Soak, fleet: RawFleet, sim: SimReport, duration_s: float) -> dict[str, Any]:
    js = soak.js
    records = await bucket_records(js)
    history = await stream_messages(js)
    last_seq = (await js.stream_info("WORKER_EVENTS")).state.last_seq
    result = audit(records, fleet, history)
    rebuilt = await replay(soak.server.url, js, records, timeout_s=120.0,
                           replicas=3 if soak.clustered else 1)  # fmt: skip
    mismatched = [w for w in records if without({w: rebuilt.get(w, {})}, "version") != without({w: records[w]}, "version")]
    version_only = [w for w in records if w not in mismatched and rebuilt.get(w) != records[w]]
    kinds = Counter(m.kind for m in history)
    finite = [x for x in soak.lag_samples if x != float("inf")]
    return {
        "minutes": round(duration_s / 60.0, 2),
        "events": last_seq,
        "events_published": {"simulator": sim.events, "raw_fleet": fleet.stored, "expired_and_late": kinds["expired"] + kinds["late"]},
        "events_in_stream_now": dict(kinds),
        "faults": dict(soak.faults),
        "lost": result["lost"],
        "double_applied": result["double_applied"],
        "false_expiries": result["false_expiries"],
        "false_expiries_by_kind": result["false_expiries_by_kind"],
        "wrong_expiry_verdicts_ignored_by_the_fold": result["wrong_expiry_verdicts_ignored_by_the_fold"],
        "replay_mismatches": len(mismatched),
        "replay_version_only_differences": len(version_only),
        "race_trials": soak.race_trials,
        "race_not_live_after_final_heartbeat": soak.race_not_live,
        "late_notices_applied_to_beating_workers": result["late_notices_applied_to_beating_workers"],
        "expiry_events_for_beating_workers": result["expiry_events_for_beating_workers"],
        "projector_lag_s": {"max_seen": round(max(finite, default=0.0), 3),
                            "samples": len(soak.lag_samples),
                            "samples_without_consumer": len(soak.lag_samples) - len(finite),
                            "folding_caught_up_after_fault_s": {k: max(v) for k, v in soak.recovered_s.items()}},
        "router_converged_after_fault_s": {k: max(v) for k, v in soak.router_converged_s.items()},
        "simulator": {"workers": sim.workers, "acked": sim.acked, "errors": sim.errors, "timeouts": sim.timeouts,
                      "restarts": sim.restarts, "silent_deaths": sim.silent_deaths},
        "raw_fleet": {"workers": len(fleet.ledgers), "stored": fleet.stored, "retries": fleet.retries},
        "registry_starts": soak.starts,
        "servers": "3-node cluster, R3, two registries" if soak.clustered else "one nats-server",
        "takeovers_s": sorted(soak.takeovers_s),
        "examples": result["examples"],
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="how long to inject faults (default 3)")
    p.add_argument("--every", type=float, default=12.0, help="seconds between faults (default 12)")
    p.add_argument("--workers", type=int, default=400, help="simulated workers (default 400)")
    p.add_argument("--raw", type=int, default=100, help="raw-fleet workers on the ledger (default 100)")
    p.add_argument("--churn", type=float, default=0.2, help="simulator churn, fleet fraction/min (default 0.2)")
    p.add_argument("--seed", type=int, default=6)
    p.add_argument("--cluster", action="store_true",
                   help="3 nats-servers (nats/cluster/), R3, two registries; node and registry kills")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.every <= 0 or args.workers < 1 or args.raw < 1:
        p.error("--minutes, --every, --workers and --raw must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logs.configure("warning", json=True)
    summary = asyncio.run(asyncio.wait_for(run(args), args.minutes * 60.0 + 300.0))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{stamp}.json"
    path.write_text(json.dumps({"command": " ".join(sys.argv), **summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)
    ok = all(summary[k] == 0 for k in ("lost", "double_applied", "false_expiries", "replay_mismatches"))
    ok = ok and max(summary["router_converged_after_fault_s"].values(), default=0.0) <= ROUTER_WITHIN_S
    return 0 if ok and summary["race_not_live_after_final_heartbeat"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
