"""The fleet simulator against a real nats-server: what lands in WORKER_EVENTS, and how it ends."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from agent.simulate import SimSettings, simulate
from registry.protocol import (
    EVENTS_STREAM,
    Control,
    HeartbeatEvent,
    RegisterEvent,
    UnregisterEvent,
    decode_event,
    encode,
)
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def js(nc: Client) -> object:
    await provision(nc)
    return nc.jetstream()


async def stored(nc: Client) -> list[Msg]:
    """Every message in WORKER_EVENTS, in order."""
    js = nc.jetstream()
    total = (await js.stream_info(EVENTS_STREAM)).state.messages
    if not total:
        return []
    sub = await js.subscribe(
        "worker.>", stream=EVENTS_STREAM, ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL, pending_msgs_limit=-1, pending_bytes_limit=-1,
    )  # fmt: skip
    msgs = [await sub.next_msg(timeout=5.0) for _ in range(total)]
    await sub.unsubscribe()
    return msgs


def settings(url: str, **kw: object) -> SimSettings:
    return SimSettings.model_validate(
        {"nats_url": url, "count": 50, "heartbeat_interval_s": 0.2, "seed": 1, **kw}
    )


async def run_for(s: SimSettings) -> object:
    return await asyncio.wait_for(simulate(s, asyncio.Event()), 15.0)


async def test_fleet_lands_registers_heartbeats_and_unregisters_that_decode(
    nats_server: NatsServer, nc: Client, js: object
) -> None:
    report = await run_for(settings(nats_server.url, duration_s=1.5))
    msgs = await stored(nc)
    events = [decode_event(m.subject, m.data) for m in msgs]
    kinds = Counter(type(e).__name__ for e in events)
    assert kinds["RegisterEvent"] == 50 and kinds["UnregisterEvent"] == 50
    assert kinds["HeartbeatEvent"] >= 250  # 50 workers x (1.5 s - registering) / 0.2 s
    assert report.acked == len(msgs) and report.errors == 0  # type: ignore[attr-defined]
    msg_ids = [m.headers["Nats-Msg-Id"] for m in msgs if m.headers]
    assert len(set(msg_ids)) == len(msgs)


async def test_heartbeats_carry_load_within_max_tasks_and_growing_completed_counts(
    nats_server: NatsServer, nc: Client, js: object
) -> None:
    await run_for(settings(nats_server.url, duration_s=1.5))
    max_tasks: dict[str, int] = {}
    completed: dict[str, int] = defaultdict(int)
    loads: set[int] = set()
    for m in await stored(nc):
        e = decode_event(m.subject, m.data)
        if isinstance(e, RegisterEvent):
            max_tasks[e.worker_id] = e.registration.max_concurrent_tasks
        elif isinstance(e, HeartbeatEvent):
            assert 0 <= e.metrics.active_tasks <= max_tasks[e.worker_id]
            assert e.metrics.completed_tasks >= completed[e.worker_id]
            completed[e.worker_id] = e.metrics.completed_tasks
            loads.add(e.metrics.active_tasks)
    assert len(loads) > 1 and sum(completed.values()) > 0


async def test_churn_restarts_and_silent_deaths_come_back_as_new_incarnations(
    nats_server: NatsServer, nc: Client, js: object
) -> None:
    # 50 workers, 6.0 of the fleet per minute: about five churn a second
    report = await run_for(settings(nats_server.url, duration_s=4.5, churn=6.0))
    events = [decode_event(m.subject, m.data) for m in await stored(nc)]
    history: dict[str, list[object]] = defaultdict(list)
    for e in events:
        history[e.worker_id].append(e)
    restarted = silent = 0
    for hist in history.values():
        for before, after in itertools.pairwise(hist):
            if isinstance(after, RegisterEvent) and after.incarnation != before.incarnation:  # type: ignore[attr-defined]
                if isinstance(before, UnregisterEvent) and before.reason == "restart":
                    restarted += 1
                elif isinstance(before, HeartbeatEvent):
                    silent += 1  # stopped beating without unregistering, then came back
    assert restarted > 0 and silent > 0
    assert report.restarts > 0 and report.silent_deaths > 0  # type: ignore[attr-defined]


async def test_a_control_register_is_answered_by_a_new_register(
    nats_server: NatsServer, nc: Client, js: object
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(simulate(settings(nats_server.url, count=5, seed=2), stop))

    async def registered() -> bool:
        return sum(1 for m in await stored(nc) if ".register." in m.subject) >= 5

    await eventually(registered, timeout=5.0)
    await nc.publish("worker.control.sim-3", encode(Control(action="register", reason="test")))

    async def registered_again() -> list[RegisterEvent]:
        regs = [
            decode_event(m.subject, m.data)
            for m in await stored(nc)
            if m.subject == "worker.register.sim-3"
        ]
        return regs if len(regs) == 2 else []  # type: ignore[return-value]

    first, again = await eventually(registered_again, timeout=5.0)
    assert first.incarnation == again.incarnation
    stop.set()
    await asyncio.wait_for(task, 10.0)


async def test_killed_workers_stop_beating_and_never_unregister(
    nats_server: NatsServer, nc: Client, js: object
) -> None:
    report = await run_for(
        settings(nats_server.url, duration_s=2.0, kill=5, kill_after_s=0.3, kill_within_s=0.5)
    )
    killed = set(report.killed)  # type: ignore[attr-defined]
    assert len(killed) == 5
    last: dict[str, str] = {}
    for m in await stored(nc):
        last[m.subject.rsplit(".", 1)[1]] = m.subject.split(".")[1]
    assert all(last[w] == "heartbeat" for w in killed)
    assert Counter(last.values())["unregister"] == 45


async def _spawn(url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.simulate", "--nats", url, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT),
    )  # fmt: skip


async def test_sigterm_ends_the_run_cleanly_with_exit_0_after_unregistering(
    nats_server: NatsServer, nc: Client, js: object
) -> None:
    proc = await _spawn(nats_server.url, "--count", "20", "--heartbeat-interval", "0.2")

    async def beating() -> bool:
        return sum(1 for m in await stored(nc) if ".heartbeat." in m.subject) >= 20

    await eventually(beating, timeout=10.0)
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), 10.0)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("simulated 20 workers for ")
    assert sum(1 for m in await stored(nc) if ".unregister." in m.subject) == 20


async def test_duration_ends_the_run_with_exit_0_and_a_json_summary(
    nats_server: NatsServer, nc: Client, js: object
) -> None:
    proc = await _spawn(nats_server.url, "--count", "10", "--heartbeat-interval", "0.2",
                        "--duration", "1", "--json", "--no-unregister")  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 10.0)
    assert proc.returncode == 0, err.decode()
    summary = json.loads(out)
    assert summary["register"] == 10 and summary["unregister"] == 0
    assert summary["heartbeat"] >= 30 and summary["errors"] == 0


async def test_an_unreachable_server_is_one_line_and_exit_1(nats_server: NatsServer) -> None:
    # a port nothing listens on: the server's own, once it is gone
    url = nats_server.url
    nats_server.kill()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import agent.simulate as s, sys; "
        "s.connect.__defaults__ = (1.0,); sys.exit(s.main(sys.argv[1:]))",
        "--nats", url, "--duration", "1", "--log-level", "error",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT),
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 10.0)
    assert proc.returncode == 1
    assert err.decode().strip().splitlines()[-1].startswith("agent simulate: cannot use NATS at ")


async def test_a_signal_while_still_connecting_ends_it_at_once(nats_server: NatsServer) -> None:
    url = nats_server.url
    nats_server.kill()
    proc = await _spawn(url, "--log-level", "warning")
    assert proc.stderr is not None
    async with asyncio.timeout(20.0):  # retrying the connection (a busy machine starts slowly)
        while b"nats_error" not in await proc.stderr.readline():
            pass
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 10.0)  # "at once": no connection to wait for
    assert proc.returncode == 0
