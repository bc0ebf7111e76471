"""Two processes, one worker id: the newer registration wins, the older process is
told (`superseded` on its control subject), stops beating without unregistering,
and says so; `agent run` exits non-zero. Never silent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from nats.aio.client import Client

from agent import Agent, AgentSuperseded
from registry import protocol
from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.faults.helpers import StoredMsg, stream_messages
from tests.integration.registry_helpers import bounded, record, running_registry
from tests.integration.test_agent import FAST
from tests.integration.test_agent_process import agent_process
from tests.integration.test_ops import run

INTERVAL_S = 1.0
WID = "twin"


def _incarnation(m: StoredMsg) -> str:
    event = protocol.decode_event(m.subject, m.data)
    assert isinstance(event, protocol.HeartbeatEvent | protocol.UnregisterEvent)
    return event.incarnation


def _agent(url: str) -> Agent:
    return Agent(url, name="twin", worker_id=WID, heartbeat_interval_s=INTERVAL_S, **FAST)


@bounded(40)
async def test_the_older_agent_is_told_and_stops_and_the_newer_stays(
    nats_server: NatsServer, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True):
        older = _agent(nats_server.url)
        await older.start()
        newer = _agent(nats_server.url)
        try:
            await newer.start()
            started = time.monotonic()
            with pytest.raises(AgentSuperseded, match="another process"):
                await asyncio.wait_for(older.wait(), 2 * INTERVAL_S + 3.0)  # + a busy machine
            told_within = time.monotonic() - started
            assert older.superseded and not older.running and newer.running
            await asyncio.sleep(2.5 * INTERVAL_S)  # the newer beats on; the older is quiet
            rec = await record(js, WID)
            recent = time.time() - INTERVAL_S  # well after its last beat was stored
            beats_after = [
                m for m in await stream_messages(js, f"worker.heartbeat.{WID}")
                if _incarnation(m) == older.incarnation and m.time.timestamp() > recent
            ]  # fmt: skip
        finally:
            await newer.stop()
            await older.stop()
    assert told_within < 2 * INTERVAL_S + 3.0
    assert rec is not None and rec["incarnation"] == newer.incarnation
    assert rec["offline_reason"] is None
    assert beats_after == []
    unregisters = await stream_messages(js, f"worker.unregister.{WID}")
    by_older = [m for m in unregisters if _incarnation(m) == older.incarnation]
    assert by_older == []  # the id is the newer process's: the older did not unregister it
    code, out, _ = await run(capsys, "explain", WID, "--nats", nats_server.url)
    assert code == 0 and f"incarnation {older.incarnation[:8]} is superseded" in out


@bounded(60)
async def test_agent_run_superseded_exits_non_zero_with_the_reason(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    args = ["--nats", nats_server.url, "--name", "twin", "--worker-id", WID,
            "--heartbeat-interval", str(INTERVAL_S)]  # fmt: skip
    async with running_registry(nats_server.url, caught_up=True):
        async with agent_process(args, tmp_path / "older.log") as older:
            await eventually(lambda: older.logged("worker_registered"), timeout=20)
            async with agent_process(args, tmp_path / "newer.log") as newer:
                await eventually(lambda: newer.logged("worker_registered"), timeout=20)
                code = await asyncio.wait_for(older.proc.wait(), 2 * INTERVAL_S + 5.0)
                assert newer.proc.returncode is None  # still running
    assert code == 1
    failed = [e for e in older.log_events() if e.get("event") == "agent_failed"]
    assert len(failed) == 1 and "superseded" in failed[0]["error"]
    assert older.logged("agent_superseded")
    assert "Traceback" not in older.log_path.read_text()
