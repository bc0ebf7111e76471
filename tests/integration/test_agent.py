"""The embeddable Agent against a real nats-server: what lands in WORKER_EVENTS."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from nats.aio.client import Client
from structlog.testing import capture_logs

from agent import Agent, Prober
from agent.agent import publish_event
from registry import embedded, protocol
from registry.embedded import NatsServer
from registry.provision import provision
from tests.conftest import eventually
from tests.integration.registry_helpers import bounded, record, registry_process

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


def port_free_reusable(host: str, port: int) -> bool:
    """The check nats-server itself passes: SO_REUSEADDR, so the TIME_WAIT sockets
    of the clients it just closed do not count as the port being taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@pytest.fixture
def restartable(monkeypatch: pytest.MonkeyPatch) -> None:
    """NatsServer.start() refuses a port with TIME_WAIT sockets on it, which every
    restart under connected clients leaves; check the way the server binds."""
    monkeypatch.setattr(embedded, "port_free", port_free_reusable)


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
@pytest.mark.usefixtures("restartable")
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
@pytest.mark.usefixtures("restartable")
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
