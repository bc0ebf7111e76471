"""The embeddable Agent against a real nats-server: what lands in WORKER_EVENTS."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from agent import Agent, Prober
from agent.publish import publish_event
from registry import protocol
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    publish,
    record,
    registry_process,
    running_registry,
    unregister_body,
)

T = TypeVar("T")
FAST = {"reconnect_wait_s": 0.1, "reconnect_jitter_s": 0.1, "publish_timeout_s": 1.0}


@dataclass(frozen=True)
class Stored:
    """One message of WORKER_EVENTS as JetStream stored it."""

    seq: int
    subject: str
    time: datetime
    msg_id: str
    event: protocol.Event

    @property
    def kind(self) -> str:
        return self.subject.split(".")[1]


async def stored(nc: Client, worker_id: str) -> list[Stored]:
    js = nc.jetstream()
    info = await js.stream_info(protocol.EVENTS_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(protocol.EVENTS_STREAM, seq)
        assert msg.subject is not None and msg.data is not None and msg.time is not None
        if msg.subject.endswith(f".{worker_id}"):
            event = protocol.decode_event(msg.subject, msg.data)
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            out.append(Stored(seq, msg.subject, msg.time, msg_id, event))
    return out


def of_kind(events: list[Stored], kind: str) -> list[Stored]:
    return [e for e in events if e.kind == kind]


async def until_stored(
    nc: Client, worker_id: str, kind: str, n: int = 1, timeout: float = 5.0
) -> list[Stored]:
    async def enough() -> list[Stored] | None:
        found = of_kind(await stored(nc, worker_id), kind)
        return found if len(found) >= n else None

    return await eventually(enough, timeout=timeout)


def agent(url: str, name: str, **options: Any) -> Agent:
    return Agent(url, name=name, **{**FAST, **options})


# ---------------------------------------------------------------- lifecycle


@bounded(20)
async def test_agent_registers_beats_and_unregisters(nats_server: NatsServer, nc: Client) -> None:
    await provision(nc)
    async with agent(nats_server.url, "life", worker_id="life-1", heartbeat_interval_s=0.2) as a:
        await until_stored(nc, "life-1", "heartbeat", n=3)
    events = await stored(nc, "life-1")
    assert events[0].kind == "register" and events[-1].kind == "unregister"
    assert {e.kind for e in events[1:-1]} == {"heartbeat"}
    assert all(e.subject == f"worker.{e.kind}.life-1" for e in events)
    assert all(e.event.incarnation == a.incarnation for e in events)  # type: ignore[union-attr]
    assert all(re.fullmatch(r"[0-9a-f]{32}", e.msg_id) for e in events)
    assert len({e.msg_id for e in events}) == len(events)
    register = events[0].event
    assert isinstance(register, protocol.RegisterEvent) and register.heartbeat_interval_s == 0.2
    assert register.registration.name == "life"


@bounded(20)
async def test_registration_reports_this_machine(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await provision(nc)
    async with agent(nats_server.url, "hw", worker_id="hw-1", disk_path=str(tmp_path), port=9100):
        pass
    register = of_kind(await stored(nc, "hw-1"), "register")[0].event
    assert isinstance(register, protocol.RegisterEvent)
    hw, where = register.registration.hardware, register.registration.location
    assert hw.cpu_cores == psutil.cpu_count(logical=True)
    assert hw.memory_gb == round(psutil.virtual_memory().total / 2**30, 2)
    assert hw.disk_space_gb == round(psutil.disk_usage(str(tmp_path)).total / 2**30, 2)
    assert hw.gpu_count == Prober().hardware().gpu_count  # 0 here: no NVIDIA driver
    assert (where.hostname, where.port) == (socket.gethostname(), 9100)
    capability = protocol.WorkerCapability.GPU if hw.gpu_count else protocol.WorkerCapability.CPU
    assert register.registration.capability is capability
    assert register.registration.supported_content_types == list(
        protocol.DEFAULT_CONTENT_TYPES[capability]
    )


@bounded(20)
async def test_set_status_beats_at_once_with_task_counters(
    nats_server: NatsServer, nc: Client
) -> None:
    await provision(nc)
    async with agent(nats_server.url, "st", worker_id="st-1", heartbeat_interval_s=60) as a:
        async with a.task():
            pass
        with pytest.raises(ValueError):
            async with a.task():
                raise ValueError("bad input")
        async with a.task():
            assert await a.set_status("busy") is True  # no waiting for the 60 s tick
            beat = of_kind(await stored(nc, "st-1"), "heartbeat")[-1].event
    assert isinstance(beat, protocol.HeartbeatEvent) and beat.status is protocol.WorkerStatus.BUSY
    m = beat.metrics
    assert (m.active_tasks, m.completed_tasks, m.failed_tasks) == (1, 1, 1)
    assert 0.0 <= m.cpu_usage_percent <= 100.0 and 0.0 < m.memory_usage_percent <= 100.0


async def test_offline_is_not_a_status_an_agent_sets(nats_server: NatsServer, nc: Client) -> None:
    await provision(nc)
    async with agent(nats_server.url, "off", worker_id="off-1", heartbeat_interval_s=60) as a:
        with pytest.raises(ValueError):
            await a.set_status("offline")


# ---------------------------------------------------------------- control


@bounded(20)
async def test_control_register_makes_the_agent_register_again(
    nats_server: NatsServer, nc: Client
) -> None:
    await provision(nc)
    with capture_logs() as logs:
        async with agent(nats_server.url, "ctl", worker_id="ctl-1", heartbeat_interval_s=0.5) as a:
            subject = protocol.control_subject("ctl-1")
            await nc.publish(subject, b"not json")
            await nc.publish(subject, b'{"v":1,"action":"cordon","reason":"later"}')
            await nc.publish(subject, b'{"v":1,"action":"register","reason":"unknown worker"}')
            again = await until_stored(nc, "ctl-1", "register", n=2)

            async def beating_after_it() -> bool:
                beats = of_kind(await stored(nc, "ctl-1"), "heartbeat")
                return any(e.seq > again[1].seq for e in beats)

            await eventually(beating_after_it)  # the junk did not stop the agent
    first, second = (e.event for e in again)
    assert isinstance(first, protocol.RegisterEvent) and isinstance(second, protocol.RegisterEvent)
    assert first.incarnation == second.incarnation == a.incarnation
    assert again[0].msg_id != again[1].msg_id
    events = [e["event"] for e in logs]
    assert {"control_undecodable", "control_ignored", "control_register_requested"} <= set(events)


# ---------------------------------------------------------------- a slot filled or freed


def active_tasks(beat: Stored) -> int:
    assert isinstance(beat.event, protocol.HeartbeatEvent)
    return beat.event.metrics.active_tasks


async def beat_after(nc: Client, worker_id: str, seq: int, active: int) -> Stored | None:
    """The first heartbeat stored after `seq` reporting `active` tasks."""
    beats = of_kind(await stored(nc, worker_id), "heartbeat")
    return next((b for b in beats if b.seq > seq and active_tasks(b) == active), None)


@bounded(20)
async def test_filling_and_freeing_the_last_slot_beats_at_once(
    nats_server: NatsServer, nc: Client
) -> None:
    await provision(nc)
    async with agent(nats_server.url, "full", worker_id="full-1", heartbeat_interval_s=5,
                     max_concurrent_tasks=1) as a:  # fmt: skip
        async with a.task():
            full = await eventually(lambda: beat_after(nc, "full-1", 0, active=1), timeout=1.0)
        freed = await eventually(lambda: beat_after(nc, "full-1", full.seq, 0), timeout=1.0)
    assert isinstance(freed.event, protocol.HeartbeatEvent)
    assert freed.event.metrics.completed_tasks == 1


@bounded(20)
async def test_immediate_beats_coalesce_under_a_burst_of_tasks(
    nats_server: NatsServer, nc: Client
) -> None:
    await provision(nc)
    async with agent(nats_server.url, "burst", worker_id="burst-1", heartbeat_interval_s=5,
                     max_concurrent_tasks=1) as a:  # fmt: skip
        started = time.monotonic()
        for _ in range(200):  # 400 changes of "has a free slot"
            async with a.task():
                await asyncio.sleep(0)
            await asyncio.sleep(0.001)
        burst_s = time.monotonic() - started
        await asyncio.sleep(0.3)  # the trailing beat
        beats = of_kind(await stored(nc, "burst-1"), "heartbeat")
    window_s = burst_s + 0.3
    assert 1 <= len(beats) <= window_s / 0.05 + 3, (len(beats), window_s)
    last = beats[-1].event
    assert isinstance(last, protocol.HeartbeatEvent)  # the final state was reported
    assert (last.metrics.active_tasks, last.metrics.completed_tasks) == (0, 200)


async def test_a_stopped_agent_still_counts_tasks(nats_server: NatsServer, nc: Client) -> None:
    await provision(nc)
    async with agent(nats_server.url, "late", worker_id="late-1", max_concurrent_tasks=1) as a:
        pass
    with a.task():  # fills the slot: the beat request finds no agent thread, and is dropped
        pass
    assert a.tasks.completed == 1


@bounded(20)
async def test_a_busy_worker_beats_right_after_registering_again(
    nats_server: NatsServer, nc: Client
) -> None:
    """A registration folds to "online, idle"; the agent corrects that at once."""
    await provision(nc)
    async with agent(nats_server.url, "rb", worker_id="rb-1", heartbeat_interval_s=5,
                     max_concurrent_tasks=1) as a:  # fmt: skip
        async with a.task():
            await eventually(lambda: beat_after(nc, "rb-1", 0, active=1), timeout=1.0)
            await nc.publish(protocol.control_subject("rb-1"), b'{"v":1,"action":"register"}')
            again = (await until_stored(nc, "rb-1", "register", n=2))[1]
            await eventually(lambda: beat_after(nc, "rb-1", again.seq, active=1), timeout=1.0)


# ---------------------------------------------------------------- surviving the network


@bounded(30)
async def test_heartbeats_flow_while_the_host_loop_is_blocked(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await provision(nc)
    args = ["--nats", nats_server.url, "--timeout-floor", "0.5", "--log-level", "warning"]
    async with registry_process(args, tmp_path / "registry.log"):
        async with agent(nats_server.url, "busy", worker_id="busy-1", heartbeat_interval_s=1.0):
            await eventually(lambda: record(nc.jetstream(), "busy-1"), timeout=10)
            blocked_from = protocol.utcnow()
            time.sleep(10)  # a blocking job that never yields to the event loop
            blocked_until = protocol.utcnow()
            rec = await record(nc.jetstream(), "busy-1")
    events = await stored(nc, "busy-1")
    beats = [e.time for e in of_kind(events, "heartbeat")]
    during = [t for t in beats if blocked_from <= t <= blocked_until]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(during)]
    assert len(during) >= 9, during
    assert max(gaps) < 1.5, gaps
    assert rec is not None and rec["status"] == "online" and rec["offline_reason"] is None
    assert of_kind(events, "expired") == []  # not even expired and revived


@bounded(30)
async def test_heartbeats_resume_after_the_server_restarts(
    nats_server: NatsServer, nc: Client
) -> None:
    await provision(nc)
    with capture_logs() as logs:
        async with agent(nats_server.url, "rs", worker_id="rs-1", heartbeat_interval_s=0.2):
            await until_stored(nc, "rs-1", "heartbeat", n=2)
            await asyncio.to_thread(nats_server.restart)
            restarted_at = protocol.utcnow()

            async def beat_after_restart() -> bool:
                return any(
                    e.time > restarted_at for e in of_kind(await stored(nc, "rs-1"), "heartbeat")
                )

            await eventually(beat_after_restart, timeout=15)
    events = [e["event"] for e in logs]
    assert "nats_disconnected" in events and "nats_reconnected" in events
    assert len(of_kind(await stored(nc, "rs-1"), "register")) == 1  # no manual action needed


@bounded(20)
async def test_a_retried_publish_is_stored_once(nats_server: NatsServer, nc: Client) -> None:
    await provision(nc)
    event = protocol.UnregisterEvent(
        worker_id="retry-1", incarnation="i1", sent_at=protocol.utcnow(), reason="test"
    )
    await asyncio.to_thread(nats_server.stop)
    with capture_logs() as logs:
        publishing = asyncio.create_task(
            publish_event(nc.jetstream(), "unregister", event, attempt_timeout_s=0.2, budget_s=None)
        )

        def retried() -> bool:
            return any(e["event"] == "publish_retrying" and e["attempts"] >= 2 for e in logs)

        await eventually(retried, timeout=5)
        await asyncio.to_thread(nats_server.start)
        assert await asyncio.wait_for(publishing, 10) is True
    published = [e for e in logs if e["event"] == "event_published"]
    assert published[-1]["duplicate"] is True  # earlier attempts reached the stream too...
    assert len(await stored(nc, "retry-1")) == 1  # ...and, with one Nats-Msg-Id, were stored once


# ---------------------------------------------------------------- end to end with the registry


@bounded(30)
async def test_the_registry_sees_the_agent_come_and_go(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await provision(nc)
    js = nc.jetstream()
    async with registry_process(["--nats", nats_server.url], tmp_path / "registry.log"):
        async with agent(nats_server.url, "e2e", worker_id="e2e-1", heartbeat_interval_s=0.3,
                         max_concurrent_tasks=2, tags={"zone": "eu-1"}):  # fmt: skip
            rec = await eventually(lambda: record(js, "e2e-1"), timeout=10)
            assert rec["status"] == "online" and rec["available"] is True
            assert rec["registration"]["tags"] == {"zone": "eu-1"}

        async def offline() -> dict[str, Any] | None:
            r = await record(js, "e2e-1")
            return r if r is not None and r["status"] == "offline" else None

        gone = await eventually(offline, timeout=10)
    assert gone["offline_reason"] == "unregistered"
    json.dumps(gone)  # a plain JSON record, as `nats kv get` shows it


async def record_updates(js: JetStreamContext, worker_id: str) -> AsyncIterator[dict[str, Any]]:
    """Every value the bucket takes for `worker_id` from now on (current one first)."""
    kv = await js.key_value(protocol.BUCKET)
    watcher = await kv.watch(worker_id)
    try:
        async for entry in watcher:
            if entry is not None and entry.value:
                yield json.loads(entry.value)
    finally:
        await watcher.stop()


async def live_record(js: JetStreamContext, worker_id: str) -> dict[str, Any] | None:
    rec = await record(js, worker_id)
    return rec if rec is not None and rec["status"] == "online" else None


@bounded(30)
async def test_a_worker_the_registry_unregistered_registers_again(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, timeout_floor_s=0.5):
        async with agent(nats_server.url, "again", worker_id="again-1",
                         heartbeat_interval_s=0.3) as a:  # fmt: skip
            first = await eventually(lambda: live_record(js, "again-1"), timeout=10)
            controls = await nc.subscribe(protocol.control_subject("again-1"))
            updates = record_updates(js, "again-1")
            try:
                await anext(updates)  # the watch is running: it yielded the current value
                bye = unregister_body("again-1", a.incarnation, reason="operator")
                unregistered = await publish(js, "unregister", "again-1", bye)
                states = await asyncio.wait_for(collect(until_live_again(updates)), 5.0)
            finally:
                await updates.aclose()
            control = json.loads((await controls.next_msg(timeout=1.0)).data)
    offline, back = states[0], states[-1]
    assert (offline["status"], offline["offline_reason"]) == ("offline", "unregistered")
    assert offline["event_seq"] == unregistered.seq
    assert control["action"] == "register"
    assert (back["status"], back["offline_reason"], back["available"]) == ("online", None, True)
    assert back["incarnation"] == first["incarnation"] == a.incarnation
    registers = of_kind(await stored(nc, "again-1"), "register")
    assert registers[0].seq < unregistered.seq < registers[1].seq


async def collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


async def until_live_again(updates: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Bucket values from the unregistered one to the first live one after it."""
    gone = False
    async for rec in updates:
        gone = gone or rec["offline_reason"] == "unregistered"
        if gone:
            yield rec
            if rec["offline_reason"] is None:
                return
