"""agent.celery end to end: real `celery worker` processes (tests/integration/celery_app.py)
on a real redis-server, a real nats-server and the registry in-process.

One scenario, two workers: `alpha` (prefork, 2 processes, text and document) and `beta`
(solo, image). Both register with the probed hardware; tasks routed with `route_task` run
on the worker the router picked, and its counts move (in prefork's children too; a task
whose child is killed counts as failed); a full or absent worker is NoWorkerAvailable;
SIGTERM unregisters them.

Needs the `redis-server` package (.ci/run installs it): skipped without it, failed in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery.exceptions import TaskRevokedError
from nats.aio.client import Client
from nats.js import JetStreamContext

from agent.celery import NoWorkerAvailable, route_task, worker_id_for
from registry.eventlog import EventQuery, read_events
from registry.ops import actions
from registry.protocol import UnregisterEvent
from registry.router import Router
from registry.server.embedded import NatsServer
from tests.conftest import eventually, port_open
from tests.integration import celery_app
from tests.integration.registry_helpers import bounded, record, running_registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs the Debian package)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(binary: str, port: int, data: Path) -> subprocess.Popen[bytes] | None:
    """redis-server on 127.0.0.1:port, keeping nothing on disk; None if it did not start."""
    with open(data / "log", "ab") as log:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(data)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    deadline = time.monotonic() + 5.0
    while proc.poll() is None and time.monotonic() < deadline:
        if port_open(port):
            return proc
        time.sleep(0.02)
    _stop(proc)
    return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5.0)


@pytest.fixture(scope="module")
def redis_url(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this module's own on a free port (tried 3 times: the port may be
    taken between choosing and binding it). One for the module: the Celery app its tests
    share keeps connections to the broker it first used."""
    data = tmp_path_factory.mktemp("redis")
    for _ in range(3):
        port = _free_port()
        proc = _start_redis(redis_binary, port, data)
        if proc is not None:
            break
    else:
        pytest.fail(f"redis-server did not start: {(data / 'log').read_text()[-2000:]}")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


class CeleryWorker:
    """`celery -A tests.integration.celery_app worker ...` in a session of its own."""

    def __init__(self, nodename: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.nodename, self.proc, self.log = nodename, proc, log
        self.worker_id = worker_id_for(nodename)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a warm shutdown); the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def celery_worker(
    tmp_path: Path, name: str, pool: str, env: dict[str, str], *args: str
) -> AsyncIterator[CeleryWorker]:
    """Started (not yet ready); on exit its whole process group is killed if still there."""
    nodename = f"{name}-{uuid.uuid4().hex[:8]}@testhost"
    log = tmp_path / f"{name}.log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
    full_env.pop("NATS_URL", None)
    with open(log, "wb") as out:  # noqa: ASYNC230 - a local file, at once
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "celery", "-A", "tests.integration.celery_app", "worker",
            "-P", pool, "-n", nodename, "-l", "INFO",
            "--without-mingle", "--without-gossip", "--without-heartbeat", *args,
            cwd=ROOT, env=full_env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
    worker = CeleryWorker(nodename, proc, log)
    try:
        yield worker
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and its pool children
            await asyncio.wait_for(proc.wait(), 10.0)


async def online(js: JetStreamContext, worker: CeleryWorker) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        rec = await record(js, worker.worker_id)
        return rec if rec is not None and rec["status"] == "online" else None

    try:
        return await eventually(check, timeout=20.0)
    except AssertionError:
        raise AssertionError(f"{worker.nodename} did not register:\n{worker.output()}") from None


async def metrics_of(js: JetStreamContext, worker: CeleryWorker) -> dict[str, Any]:
    rec = await record(js, worker.worker_id)
    assert rec is not None
    metrics: dict[str, Any] = rec["metrics"]
    return metrics


async def outcome(result: Any, timeout: float = 15.0) -> Any:
    """The task's return value (the result backend is read in a thread)."""
    return await asyncio.to_thread(result.get, timeout=timeout)


@bounded(60)
async def test_celery_workers_register_take_routed_tasks_count_them_and_leave(
    nats_server: NatsServer, nc: Client, redis_url: str, tmp_path: Path
) -> None:
    celery_app.app.conf.update(broker_url=redis_url, result_backend=redis_url)
    env = {"FLEET_TEST_BROKER": redis_url, "FLEET_TEST_NATS": nats_server.url}
    js = nc.jetstream()
    async with (
        running_registry(nats_server.url, caught_up=True),
        celery_worker(tmp_path, "alpha", "prefork",
                      {**env, "FLEET_TEST_CONTENT_TYPES": "text,document"}, "-c", "2") as alpha,
        celery_worker(tmp_path, "beta", "solo", {**env, "FLEET_TEST_CONTENT_TYPES": "image"}) as beta,
        await Router.connect(nats_server.url) as router,
    ):  # fmt: skip
        a, b = await online(js, alpha), await online(js, beta)
        for rec, worker in ((a, alpha), (b, beta)):
            reg = rec["registration"]
            assert reg["name"] == worker.nodename
            assert reg["capability"] == "cpu"
            assert reg["tags"] == {"pool": "test"}
            assert reg["hardware"]["cpu_cores"] == psutil.cpu_count(logical=True)
            assert reg["hardware"]["memory_gb"] == round(psutil.virtual_memory().total / 2**30, 2)
        assert a["registration"]["supported_content_types"] == ["text", "document"]
        assert b["registration"]["supported_content_types"] == ["image"]
        assert a["registration"]["max_concurrent_tasks"] == 2  # -c 2
        assert b["registration"]["max_concurrent_tasks"] == 1  # solo
        await eventually(lambda: len(router.available("cpu")) == 2, timeout=10.0)

        # alpha (prefork) runs a slow task in one child and a long one in the other; beta
        # (solo) one sent by name. Both are then full: nobody else takes text or an image,
        # and nobody at all a video
        slow = route_task(router, celery_app.whoami, "cpu", "text", args=(2.0,))
        doomed = route_task(router, celery_app.whoami, "cpu", "text", args=(30.0,))
        long = route_task(router, "tests.integration.celery_app.whoami", "cpu", "image",
                          args=(1.0,), app=celery_app.app)  # fmt: skip
        for content_type in ("text", "image", "video"):
            with pytest.raises(NoWorkerAvailable):
                route_task(router, celery_app.whoami, "cpu", content_type)
        await eventually(lambda: _active(js, alpha, 2), timeout=5.0)  # told by its children
        # the main process kills the long task's child: it tells of the end, the child can't
        await asyncio.to_thread(celery_app.app.control.revoke, doomed.id, terminate=True)
        with pytest.raises(TaskRevokedError):
            await outcome(doomed)
        assert await outcome(long) == beta.nodename
        assert await outcome(slow) == alpha.nodename

        quick = route_task(router, celery_app.whoami, "cpu", "document")
        assert await outcome(quick) == alpha.nodename
        router.release(alpha.worker_id)  # done before alpha's next update: give the slot back
        with pytest.raises(ValueError, match="always fails"):
            await outcome(route_task(router, celery_app.fail, "cpu", "text"))

        async def counted() -> bool:
            m = await metrics_of(js, alpha)
            return (m["completed_tasks"], m["failed_tasks"], m["active_tasks"]) == (2, 2, 0)

        await eventually(counted, timeout=5.0)
        m = await metrics_of(js, alpha)
        assert 0.9 < m["avg_task_duration_seconds"] < 1.5  # (2.0 + 0.05) / 2, give or take
        await eventually(lambda: _completed(js, beta, 1), timeout=5.0)

        assert await asyncio.gather(alpha.stop(), beta.stop()) == [0, 0]
        for rec, worker in [(await _offline(js, w), w) for w in (alpha, beta)]:
            assert rec["offline_reason"] == "unregistered", worker.output()


async def _active(js: JetStreamContext, worker: CeleryWorker, n: int) -> bool:
    return (await metrics_of(js, worker))["active_tasks"] == n


async def _completed(js: JetStreamContext, worker: CeleryWorker, n: int) -> bool:
    return (await metrics_of(js, worker))["completed_tasks"] == n


async def _offline(js: JetStreamContext, worker: CeleryWorker) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        rec = await record(js, worker.worker_id)
        return rec if rec is not None and rec["status"] == "offline" else None

    rec: dict[str, Any] = await eventually(check, timeout=5.0)
    return rec


@bounded(60)
async def test_a_drained_celery_worker_finishes_its_task_and_leaves(
    nats_server: NatsServer, nc: Client, redis_url: str, tmp_path: Path
) -> None:
    celery_app.app.conf.update(broker_url=redis_url, result_backend=redis_url)
    env = {"FLEET_TEST_BROKER": redis_url, "FLEET_TEST_NATS": nats_server.url}
    js = nc.jetstream()
    async with (
        running_registry(nats_server.url, caught_up=True),
        celery_worker(tmp_path, "gamma", "solo", env) as gamma,
        await Router.connect(nats_server.url) as router,
    ):  # fmt: skip
        await online(js, gamma)
        await eventually(lambda: len(router.available("cpu")) == 1, timeout=10.0)
        running = route_task(router, celery_app.whoami, "cpu", "text", args=(2.0,))
        await eventually(lambda: _active(js, gamma, 1), timeout=10.0)
        await actions.publish(nc, "drain", gamma.worker_id, "ops", "node rotation")
        assert await outcome(running) == gamma.nodename  # its task finished
        assert await asyncio.wait_for(gamma.proc.wait(), 30) == 0  # then it left by itself
        rec = await _offline(js, gamma)
        assert rec["offline_reason"] == "unregistered" and rec["cordon"]["drain"], gamma.output()
    events = await read_events(nc, EventQuery(worker_id=gamma.worker_id, kind="unregister"))
    assert isinstance(events[-1].event, UnregisterEvent) and events[-1].event.reason == "drained"
    assert (await metrics_of(js, gamma))["completed_tasks"] == 1


@bounded(30)
async def test_a_bad_configuration_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Checked before the worker starts, so no broker or NATS is needed."""
    env = {"FLEET_TEST_BROKER": "redis://127.0.0.1:1/0", "FLEET_TEST_CAPABILITY": "quantum"}
    async with celery_worker(tmp_path, "bad", "solo", env) as worker:
        assert await asyncio.wait_for(worker.proc.wait(), 20.0) == 2
    lines = [line for line in worker.output().splitlines() if line.strip()]
    assert len(lines) == 1, worker.output()  # no traceback, no banner
    assert lines[0].startswith(
        f"celery worker {worker.nodename}: worker_registry: invalid capability 'quantum': "
    )
