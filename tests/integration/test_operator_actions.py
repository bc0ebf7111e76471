"""Cordon, uncordon and drain: operator events folded like any other, against a real
nats-server, a real registry, real agents (embedded and `agent run`) and a real router."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest
from nats.aio.client import Client

from agent import Agent
from registry import fold, protocol
from registry.eventlog import EventQuery, read_events
from registry.protocol import WorkerInfo
from registry.router import Router
from registry.server.embedded import NatsServer
from registry.server.provision import DEFAULT_NAMES, provision, stream_configs
from registry.server.store import Bucket
from tests.conftest import eventually
from tests.integration.registry_helpers import bounded, registry_cli, running_registry

FAST = {"reconnect_wait_s": 0.1, "reconnect_jitter_s": 0.1, "publish_timeout_s": 1.0,
        "heartbeat_interval_s": 0.3}  # fmt: skip


async def record(nc: Client, worker_id: str) -> WorkerInfo:
    entry = await Bucket(nc).get(worker_id)
    assert entry is not None
    return entry.record


async def replayed(nc: Client, worker_id: str) -> WorkerInfo | None:
    """The worker's retained events through the pure fold, as a replay would."""
    folded: WorkerInfo | None = None
    for e in await read_events(nc, EventQuery(worker_id=worker_id, limit=10_000)):
        if e.event is not None:
            outcome = fold.evolve(folded, e.event, e.seq, e.time)
            if isinstance(outcome, fold.Applied):
                folded = outcome.record
    return folded


@bounded(90)
async def test_cordon_keeps_running_work_takes_no_new_and_survives_a_restart(
    nats_server: NatsServer, nc: Client
) -> None:
    url = nats_server.url
    async with running_registry(url, caught_up=True):
        router = await Router.connect(url)
        try:
            await router.ready()
            async with Agent(url, name="gpu-a", worker_id="gpu-a", capability="gpu",
                             max_concurrent_tasks=2, **FAST) as agent:  # fmt: skip
                await eventually(lambda: router.pick(capability="gpu") is not None, timeout=10)
                task = agent.task()
                task.__enter__()  # one task runs through the cordon

                code, out, err = await registry_cli(
                    url, "cordon", "gpu-a", "--reason", "disk swap", "--by", "alice"
                )
                assert code == 0, err
                assert "cordoned by alice" in out and "disk swap" in out
                r = await record(nc, "gpu-a")
                assert r.cordon is not None and (r.cordon.by, r.cordon.reason) == ("alice", "disk swap")
                assert not r.available and r.live
                await eventually(lambda: router.pick(capability="gpu") is None, timeout=10)
                # running work goes on and is still counted
                await eventually(lambda: _active(nc, "gpu-a", 1), timeout=10)

                code, out, _ = await registry_cli(url, "workers")
                assert code == 0 and "cordoned by alice" in out
                code, out, _ = await registry_cli(url, "explain", "gpu-a")
                assert code == 0
                assert "NOT AVAILABLE: cordoned by alice" in out and "reason: disk swap" in out
                assert "cordoned by alice: disk swap" in out  # the history line
                code, out, _ = await registry_cli(url, "get", "gpu-a")
                assert json.loads(out)["cordon"]["by"] == "alice"
                task.__exit__(None, None, None)
                await eventually(lambda: _active(nc, "gpu-a", 0), timeout=10)
                assert (await record(nc, "gpu-a")).available is False  # idle, still cordoned

            # the worker restarts (a new incarnation): still cordoned
            async with Agent(url, name="gpu-a", worker_id="gpu-a", capability="gpu", **FAST) as again:
                r = await eventually(lambda: _incarnation(nc, "gpu-a", again.incarnation), timeout=10)
                assert r.cordon is not None and r.cordon.by == "alice" and not r.available
                await asyncio.sleep(0.5)
                assert router.pick(capability="gpu") is None

                code, out, err = await registry_cli(url, "uncordon", "gpu-a", "--by", "bob")
                assert code == 0, err
                assert "uncordoned, available" in out
                await eventually(lambda: router.pick(capability="gpu") is not None, timeout=10)
                assert (await record(nc, "gpu-a")).cordon is None
        finally:
            await router.close()

    # replay: the same pure fold over the stream gives the same record
    final, folded = await record(nc, "gpu-a"), await replayed(nc, "gpu-a")
    assert folded is not None
    assert (folded.cordon, folded.available, folded.event_seq) == (
        final.cordon, final.available, final.event_seq)  # fmt: skip
    events = await read_events(nc, EventQuery(worker_id="gpu-a", limit=1000))
    assert [e.kind for e in events if e.kind in protocol.OPERATOR_KINDS] == ["cordon", "uncordon"]


async def _active(nc: Client, worker_id: str, n: int) -> bool:
    return (await record(nc, worker_id)).metrics.active_tasks == n


async def _incarnation(nc: Client, worker_id: str, incarnation: str) -> WorkerInfo | None:
    r = await record(nc, worker_id)
    return r if r.incarnation == incarnation and r.live else None


@bounded(90)
async def test_drain_tells_the_agent_which_finishes_its_task_and_leaves(
    nats_server: NatsServer, nc: Client
) -> None:
    url = nats_server.url
    heard: list[tuple[bool, str]] = []
    async with running_registry(url, caught_up=True):
        async with Agent(url, name="cpu-d", worker_id="cpu-d", capability="cpu", **FAST) as agent:
            agent.on_drain(lambda draining, reason: heard.append((draining, reason)))
            with agent.task():
                code, out, err = await registry_cli(
                    url, "drain", "cpu-d", "--reason", "kernel update", "--by", "carol"
                )
                assert code == 0, err
                assert "draining by carol" in out
                await eventually(lambda: agent.draining, timeout=10)
                assert heard[0][0] is True and "carol" in heard[0][1] and "kernel update" in heard[0][1]
                assert "carol" in agent.drain_reason
                r = await record(nc, "cpu-d")
                assert r.cordon is not None and r.cordon.drain and not r.available
                assert fold.availability_reason(r) == "draining"
                # a task still runs: not drained yet
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(agent.drained(), 1.0)
                # a cordon cannot water a drain down
                code, _, err = await registry_cli(url, "cordon", "cpu-d")
                assert code == 1 and "draining" in err and "Traceback" not in err
                code, _, err = await registry_cli(url, "drain", "cpu-d")  # nothing to add
                assert code == 1 and "already draining by carol" in err
            await asyncio.wait_for(agent.drained(), 5.0)
            await agent.stop(reason="drained")
        r = await record(nc, "cpu-d")
        assert r.offline_reason is protocol.OfflineReason.UNREGISTERED and r.cordon is not None
        code, out, _ = await registry_cli(url, "explain", "cpu-d")
        assert "reason: drained" in out and "drained by carol" in out
    assert len(heard) == 1  # told once, however many heartbeats repeated it


@bounded(90)
async def test_agent_run_exit_when_drained_and_uncordon_lifts_a_drain(
    nats_server: NatsServer, nc: Client
) -> None:
    url = nats_server.url
    lifted: list[tuple[bool, str]] = []
    async with running_registry(url, caught_up=True):
        # an embedded agent: drained, then uncordoned before it left
        async with Agent(url, name="keep", worker_id="keep", **FAST) as keep:
            keep.on_drain(lambda draining, reason: lifted.append((draining, reason)))
            assert (await registry_cli(url, "drain", "keep"))[0] == 0
            await eventually(lambda: keep.draining, timeout=10)
            code, _, err = await registry_cli(url, "uncordon", "keep")
            assert code == 0, err
            await eventually(lambda: not keep.draining, timeout=10)
            assert [d for d, _ in lifted] == [True, False]
            await eventually(lambda: _available(nc, "keep"), timeout=10)

        # `agent run --exit-when-drained` as a process
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", "--nats", url, "--name", "runner",
            "--worker-id", "runner", "--heartbeat-interval", "0.3", "--exit-when-drained",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await eventually(lambda: _available(nc, "runner"), timeout=20)
            code, _, err = await registry_cli(url, "drain", "runner", "--reason", "resize")
            assert code == 0, err
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        r = await record(nc, "runner")
        assert r.offline_reason is protocol.OfflineReason.UNREGISTERED
        events = await read_events(nc, EventQuery(worker_id="runner", kind="unregister"))
        assert isinstance(events[-1].event, protocol.UnregisterEvent)
        assert events[-1].event.reason == "drained"


async def _available(nc: Client, worker_id: str) -> bool:
    entry = await Bucket(nc).get(worker_id)
    return entry is not None and entry.record.available


@bounded(60)
async def test_bad_operator_actions_are_one_line_and_publish_nothing(
    nats_server: NatsServer, nc: Client
) -> None:
    url = nats_server.url
    async with running_registry(url, caught_up=True):
        async with Agent(url, name="w", worker_id="w", **FAST):
            cases: list[tuple[list[str], int, str]] = [
                (["cordon", "nobody"], 1, "no worker"),
                (["uncordon", "w"], 1, "not cordoned"),
                (["drain", "bad.id"], 2, "invalid"),
                (["cordon", "w", "--reason", "x" * 2000], 2, ""),
            ]
            for argv, want, text in cases:
                code, out, err = await registry_cli(url, *argv)
                assert (code, out) == (want, ""), (argv, err)
                assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
                assert text in err
            unreachable = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "registry.cli", "cordon", "w", "--nats",
                "nats://127.0.0.1:1", stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err_b = await asyncio.wait_for(unreachable.communicate(), 30)
            assert unreachable.returncode == 1 and b"Traceback" not in err_b
    events = await read_events(nc, EventQuery(limit=1000))
    assert not [e for e in events if e.kind in protocol.OPERATOR_KINDS]


async def test_an_old_deployments_event_stream_grows_the_operator_subjects(
    nats_server: NatsServer, nc: Client
) -> None:
    """A stream provisioned by the previous version (five subjects) is updated in place."""
    old = stream_configs(DEFAULT_NAMES)[0]
    old["subjects"] = [s for s in old["subjects"] if s.split(".")[1] not in protocol.OPERATOR_KINDS]
    js = nc.jetstream()
    await nc.request("$JS.API.STREAM.CREATE." + old["name"], json.dumps(old).encode(), timeout=5)
    await js.publish("worker.register.w", b"{}")  # history is kept
    await provision(nc)
    info = await js.stream_info(protocol.EVENTS_STREAM)
    assert set(info.config.subjects or []) >= {f"worker.{k}.*" for k in protocol.EVENT_KINDS}
    assert info.state.messages == 1
    ack = await js.publish("worker.cordon.w", b"{}")
    assert ack.stream == protocol.EVENTS_STREAM

