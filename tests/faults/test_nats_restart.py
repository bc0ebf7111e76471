"""Restart the nats-server (file storage, same port and store) under load.

Real `agent.Agent`s, a `Router`, the registry (in-process) and a raw fleet of
100 workers all ride the restart out by themselves: every event the stream
acknowledged is in it afterwards and its effect in the bucket, nobody is
expired, and the router still follows changes.

`restart` stops the server with SIGTERM (it flushes); `kill9` kills it with
SIGKILL: the process dies, the machine does not, so what the server had handed
to the operating system survives (an fsync policy matters only for a power loss).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from agent import Agent
from registry.protocol import Availability
from registry.router import Router
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.faults.helpers import (
    RawFleet,
    StoredMsg,
    exactly_once,
    late_notices,
    stream_last_seq,
    stream_messages,
)
from tests.integration.registry_helpers import (
    bounded,
    bucket_records,
    record,
    running_registry,
)

AGENTS = 3
AGENT_INTERVAL_S = 0.5
FLOOR_S = 1.0  # agents: timeout max(1.0, 3 x 0.5) = 1.5 s
RAW_WORKERS = 100
RAW_RATE_HZ = 4.0
RAW_DECLARED_S = 1.0  # timeout 3 s
RESTARTS = 2
RESUME_WITHIN_S = 3.0  # agents reconnect (0.1-0.2 s), beat (<= 0.5 s), the registry folds
FAST: dict[str, Any] = {"reconnect_wait_s": 0.1, "reconnect_jitter_s": 0.1, "publish_timeout_s": 1.0}


def _restart(server: NatsServer, how: str) -> None:
    if how == "kill9":
        server.kill()
        server.start()
    else:
        server.restart()


async def _agent_beat_after(js: JetStreamContext, agent: Agent, seq: int) -> bool:
    rec = await record(js, agent.worker_id)
    return rec is not None and rec["last_heartbeat_seq"] > seq and rec["offline_reason"] is None


async def _fleet_beat_after(js: JetStreamContext, fleet: RawFleet, seq: int) -> bool:
    records = await bucket_records(js)
    return all(records.get(w, {}).get("event_seq", 0) > seq for w in fleet.ledgers)


def _expiries(stored: dict[int, StoredMsg]) -> list[str]:
    """Every expiry, with the worker's last heartbeat stored before it."""
    out, beats = [], {}
    for seq in sorted(stored):
        m = stored[seq]
        if m.kind == "heartbeat":
            beats[m.worker_id] = m
        elif m.kind == "expired":
            judged = m.json()["last_heartbeat"]
            prev = beats.get(m.worker_id)
            out.append(f"{m.worker_id} at {m.time.time()} judged {judged[11:23]}, last beat "
                       f"{prev.time.time() if prev else None} (seq {seq})")  # fmt: skip
    return out


async def _router_sees(router: Router, wid: str, check: Callable[[Availability], bool]) -> bool:
    avail = router.get(wid)
    return avail is not None and check(avail)


async def _restarts(nc: Client, js: JetStreamContext, server: NatsServer, how: str,
                    agents: list[Agent], fleet: RawFleet) -> list[float]:  # fmt: skip
    """Restart under load; how long after each the agents' new beats were folded."""
    resumed = []
    for _ in range(RESTARTS):
        await asyncio.sleep(1.0)  # under load
        mark = await stream_last_seq(nc)
        await asyncio.to_thread(_restart, server, how)
        back = time.monotonic()
        for agent in agents:  # each one reconnected by itself, beats, and is folded
            await eventually(lambda a=agent, m=mark: _agent_beat_after(js, a, m), timeout=15.0)
        resumed.append(time.monotonic() - back)
        await eventually(lambda m=mark: _fleet_beat_after(js, fleet, m), timeout=15.0)
    return resumed


async def _router_follows(router: Router, agent: Agent) -> None:
    """A change made now reaches the router (it re-subscribed by itself)."""
    wid = agent.worker_id
    await agent.set_status("maintenance")
    await eventually(lambda: _router_sees(router, wid, lambda v: v.status == "maintenance"))
    assert router.get(wid) is not None and router.get(wid).available is False  # type: ignore[union-attr]
    await agent.set_status("online")
    await eventually(lambda: _router_sees(router, wid, lambda v: v.available))


async def _all_folded(js: JetStreamContext, fleet: RawFleet) -> bool:
    records = await bucket_records(js)
    return all(records.get(w, {}).get("event_seq") == led.last_seq for w, led in fleet.ledgers.items())


@pytest.mark.parametrize("how", ["restart", "kill9"])
@bounded(90)
async def test_nats_restart_under_load_loses_no_acked_event_and_expires_nobody(
    nats_server: NatsServer, nc: Client, how: str
) -> None:
    js = nc.jetstream()
    await provision(nc)
    fleet = RawFleet(js, RAW_WORKERS, rate_hz=RAW_RATE_HZ, declared_interval_s=RAW_DECLARED_S)
    agents = [
        Agent(nats_server.url, name=f"agent-{i}", worker_id=f"agent-{i}",
              heartbeat_interval_s=AGENT_INTERVAL_S, **FAST)
        for i in range(AGENTS)
    ]
    async with running_registry(nats_server.url, caught_up=True, timeout_floor_s=FLOOR_S):
        router = await Router.connect(nats_server.url)
        try:
            await fleet.register_all()
            for agent in agents:
                await agent.start()
            await router.ready()
            async with fleet.beating():
                for agent in agents:
                    await eventually(lambda a=agent: _router_sees(router, a.worker_id, lambda v: v.available))
                resumed = await _restarts(nc, js, nats_server, how, agents, fleet)
                await _router_follows(router, agents[0])
            await eventually(lambda: _all_folded(js, fleet), timeout=15.0)
            records = await bucket_records(js)
        finally:
            for agent in agents:
                await agent.stop()
            await router.close()
    stored = {m.seq: m for m in await stream_messages(js)}
    expired = _expiries(stored)

    missing = [(w, s) for w, led in fleet.ledgers.items() for s in led.seqs
               if s not in stored or stored[s].worker_id != w]  # fmt: skip
    assert not missing, f"{len(missing)} acknowledged events are not in the stream: {missing[:5]}"
    verdict = exactly_once(records, fleet, await late_notices(js))
    assert verdict.ok, f"lost {list(verdict.lost.items())[:3]}, doubled {list(verdict.doubled.items())[:3]}"
    assert all(records[a.worker_id]["offline_reason"] is None for a in agents)
    assert max(resumed) < RESUME_WITHIN_S, f"folding resumed {resumed} s after the restarts"
    assert not expired, f"{len(expired)} expiries: {expired[:4]}"


@bounded(60)
async def test_nats_server_down_longer_than_the_timeout_expires_nobody(
    nats_server: NatsServer, nc: Client
) -> None:
    """Nobody can beat while the server is down; once it is back, the workers
    reconnect and beat, and the registry must judge them on those beats."""
    js = nc.jetstream()
    await provision(nc)
    agents = [
        Agent(nats_server.url, name=f"agent-{i}", worker_id=f"agent-{i}",
              heartbeat_interval_s=AGENT_INTERVAL_S, **FAST)
        for i in range(AGENTS)
    ]
    timeout_s = max(FLOOR_S, 3 * AGENT_INTERVAL_S)
    async with running_registry(nats_server.url, caught_up=True, timeout_floor_s=FLOOR_S):
        try:
            for agent in agents:
                await agent.start()
            mark = await stream_last_seq(nc)
            for agent in agents:
                await eventually(lambda a=agent: _agent_beat_after(js, a, mark), timeout=5.0)
            await asyncio.to_thread(nats_server.stop)
            await asyncio.sleep(2 * timeout_s)
            await asyncio.to_thread(nats_server.start)
            mark = await eventually(lambda: stream_last_seq(nc), timeout=10.0)
            for agent in agents:
                await eventually(lambda a=agent: _agent_beat_after(js, a, mark), timeout=10.0)
            await asyncio.sleep(2 * timeout_s)  # judged on their beats for two timeouts
            records = await bucket_records(js)
        finally:
            for agent in agents:
                await agent.stop()
    expired = _expiries({m.seq: m for m in await stream_messages(js)})
    assert not expired, f"{len(expired)} expiries: {expired[:4]}"
    assert all(records[a.worker_id]["offline_reason"] is None for a in agents)
