"""`agent run` as a process: signals shut it down cleanly, an absent server is waited for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from registry import protocol
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.integration.registry_helpers import bounded, record, running_registry, stored_time

ROOT = Path(__file__).resolve().parents[2]


class AgentProcess:
    """`python -m agent run ...`; stderr (JSON log lines) goes to a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def logged(self, event: str) -> bool:
        return any(e.get("event") == event for e in self.log_events())

    async def signal(self, sig: signal.Signals, timeout: float = 10.0) -> int:
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)


@contextlib.asynccontextmanager
async def agent_process(args: list[str], log_path: Path) -> AsyncIterator[AgentProcess]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", *args, cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        yield AgentProcess(proc, log_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def subjects(nc: Client, worker_id: str) -> list[str]:
    js = nc.jetstream()
    info = await js.stream_info(protocol.EVENTS_STREAM, subjects_filter=f"worker.*.{worker_id}")
    return sorted(info.state.subjects or {})


@bounded(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_unregisters_and_exits_0(
    sig: signal.Signals, nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await provision(nc)
    args = ["--nats", nats_server.url, "--name", "proc", "--worker-id", "proc-1",
            "--heartbeat-interval", "0.3"]  # fmt: skip
    async with agent_process(args, tmp_path / "agent.log") as agent:
        await eventually(lambda: agent.logged("worker_registered"), timeout=15)
        assert await agent.signal(sig) == 0
    assert "worker.unregister.proc-1" in await subjects(nc, "proc-1")
    js = nc.jetstream()
    last = await js.get_last_msg(protocol.EVENTS_STREAM, "worker.unregister.proc-1")
    register = await js.get_last_msg(protocol.EVENTS_STREAM, "worker.register.proc-1")
    assert last.data is not None and register.data is not None
    bye = protocol.decode_event(last.subject or "", last.data)
    hello = protocol.decode_event(register.subject or "", register.data)
    assert bye.incarnation == hello.incarnation  # type: ignore[union-attr]
    assert "Traceback" not in agent.log_path.read_text()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@bounded(30)
async def test_an_unreachable_server_is_retried_until_sigint(tmp_path: Path) -> None:
    args = ["--nats", f"nats://127.0.0.1:{unused_port()}", "--name", "lonely"]
    async with agent_process(args, tmp_path / "agent.log") as agent:
        await eventually(lambda: agent.logged("nats_unreachable"), timeout=15)
        assert await agent.signal(signal.SIGINT) == 0
    assert "Traceback" not in agent.log_path.read_text()


# ---------------------------------------------------------------- end to end with the registry


async def in_state(js: JetStreamContext, worker_id: str, status: str) -> dict[str, Any] | None:
    rec = await record(js, worker_id)
    return rec if rec is not None and rec["status"] == status else None


@bounded(40)
async def test_agent_run_is_seen_by_the_registry_until_sigterm(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    args = ["--nats", nats_server.url, "--name", "e2e", "--worker-id", "e2e-proc",
            "--heartbeat-interval", "0.3"]  # fmt: skip
    async with running_registry(nats_server.url, timeout_floor_s=0.5):
        async with agent_process(args, tmp_path / "agent.log") as agent:
            first = await eventually(lambda: in_state(js, "e2e-proc", "online"), timeout=15)

            async def beaten_since() -> dict[str, Any] | None:
                rec = await in_state(js, "e2e-proc", "online")
                later = rec is not None and rec["last_heartbeat"] != first["last_heartbeat"]
                return rec if later else None

            beaten = await eventually(beaten_since, timeout=5)
            assert await agent.signal(signal.SIGTERM) == 0
        gone = await eventually(lambda: in_state(js, "e2e-proc", "offline"), timeout=10)
    hardware = first["registration"]["hardware"]
    assert hardware["cpu_cores"] == psutil.cpu_count(logical=True)
    assert hardware["memory_gb"] == round(psutil.virtual_memory().total / 2**30, 2)
    assert stored_time(beaten["last_heartbeat"]) > stored_time(first["last_heartbeat"])
    assert beaten["event_seq"] > first["event_seq"]
    assert (gone["offline_reason"], gone["available"]) == ("unregistered", False)
    assert gone["incarnation"] == first["incarnation"]
    assert "Traceback" not in agent.log_path.read_text()
