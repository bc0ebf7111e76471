"""Helpers for the registry integration tests.

Event bodies are built here as plain dicts and sent as `json.dumps` bytes with a
plain nats-py client, exactly as DESIGN.md documents them, so the tests pin the
wire contract without importing the project's own models. Bucket records and
availability messages are read back as decoded JSON for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, Self, TypeVar

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NotFoundError

from registry.cancel import raise_if_cancelled
from registry.server import app
from registry.server.settings import RegistrySettings
from registry.lastvalues import is_deleted, read_last_values
from tests.conftest import eventually, stop_task

P = ParamSpec("P")
T = TypeVar("T")

EVENTS = "WORKER_EVENTS"
AVAILABILITY = "WORKER_AVAILABILITY"
BUCKET = "workers"
CONSUMER = "registry-projector"


def bounded(seconds: float) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Fail an async test that runs longer than `seconds` (no pytest-timeout here)."""

    def deco(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            async with asyncio.timeout(seconds):
                return await fn(*args, **kwargs)

        return wrapper

    return deco


# ---------------------------------------------------------------- raw bodies


def rfc3339(at: datetime | None = None, offset_s: float = 0.0) -> str:
    at = (at or datetime.now(UTC)) + timedelta(seconds=offset_s)
    return at.isoformat().replace("+00:00", "Z")


def new_incarnation() -> str:
    return uuid.uuid4().hex


def registration(
    worker_id: str,
    *,
    capability: str = "gpu",
    max_concurrent_tasks: int = 2,
    supported_content_types: list[str] | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "worker_id": worker_id,
        "name": f"worker {worker_id}",
        "capability": capability,
        "hardware": {
            "cpu_cores": 16, "memory_gb": 62.5, "gpu_count": 1, "gpu_memory_gb": 24.0,
            "gpu_models": ["NVIDIA L4"], "disk_space_gb": 512.0,
        },
        "location": {
            "hostname": f"host-{worker_id}", "ip_address": "10.1.2.3", "port": 8000,
            "is_remote": True, "network_latency_ms": None,
        },
        "max_concurrent_tasks": max_concurrent_tasks,
        "supported_content_types": (
            ["audio", "video", "image"] if supported_content_types is None
            else supported_content_types
        ),
        "tags": tags or {"zone": "eu-1"},
    }  # fmt: skip


def register_body(
    worker_id: str,
    incarnation: str,
    *,
    heartbeat_interval_s: float = 30.0,
    sent_at: str | None = None,
    **reg: Any,
) -> dict[str, Any]:
    return {
        "v": 1,
        "worker_id": worker_id,
        "incarnation": incarnation,
        "sent_at": sent_at or rfc3339(),
        "registration": registration(worker_id, **reg),
        "heartbeat_interval_s": heartbeat_interval_s,
    }


def metrics(
    *,
    cpu: float = 12.5,
    memory: float = 40.0,
    gpu: float = 0.0,
    active_tasks: int = 0,
    completed_tasks: int = 0,
    failed_tasks: int = 0,
    avg_task_duration_seconds: float = 0.0,
) -> dict[str, Any]:
    return {
        "cpu_usage_percent": cpu, "memory_usage_percent": memory, "gpu_usage_percent": gpu,
        "active_tasks": active_tasks, "completed_tasks": completed_tasks,
        "failed_tasks": failed_tasks, "avg_task_duration_seconds": avg_task_duration_seconds,
    }  # fmt: skip


def heartbeat_body(
    worker_id: str,
    incarnation: str,
    *,
    status: str = "online",
    sent_at: str | None = None,
    **m: Any,
) -> dict[str, Any]:
    return {
        "v": 1,
        "worker_id": worker_id,
        "incarnation": incarnation,
        "sent_at": sent_at or rfc3339(),
        "status": status,
        "metrics": metrics(**m),
    }


def unregister_body(
    worker_id: str, incarnation: str, *, reason: str = "shutdown", sent_at: str | None = None
) -> dict[str, Any]:
    return {
        "v": 1,
        "worker_id": worker_id,
        "incarnation": incarnation,
        "sent_at": sent_at or rfc3339(),
        "reason": reason,
    }


def expired_body(worker_id: str, last_heartbeat: str, timeout_s: float) -> dict[str, Any]:
    return {
        "v": 1,
        "worker_id": worker_id,
        "last_heartbeat": last_heartbeat,
        "timeout_s": timeout_s,
        "detected_at": rfc3339(),
    }


# ---------------------------------------------------------------- talking to JetStream


async def publish(
    js: JetStreamContext, kind: str, worker_id: str, body: dict[str, Any] | bytes
) -> PubAck:
    """Publish one event with a random Nats-Msg-Id, as an agent does."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Nats-Msg-Id": secrets.token_hex(16)}
    return await js.publish(f"worker.{kind}.{worker_id}", data, headers=headers)


async def bucket_records(js: JetStreamContext) -> dict[str, dict[str, Any]]:
    """Every current value of bucket `workers`, as decoded JSON.

    Read the way the registry reads the bucket (`registry.lastvalues.read_last_values`,
    on the connection behind `js`): every key the stream lists, even while the
    registry writes. Not with nats-py's `kv.keys()` (it signals "no more keys"
    from consumer info, and returns none when the server pushed every key before
    that reply), nor until a message says nothing is pending (a key whose value
    is replaced meanwhile comes after that).
    """
    out: dict[str, dict[str, Any]] = {}

    def take(key: str, msg: Msg) -> None:
        out.pop(key, None)
        if not is_deleted(msg):
            out[key] = json.loads(msg.data)

    await read_last_values(js._nc, f"KV_{BUCKET}", f"$KV.{BUCKET}.", take, 30.0)
    return out


async def record(js: JetStreamContext, worker_id: str) -> dict[str, Any] | None:
    kv = await js.key_value(BUCKET)
    try:
        entry = await kv.get(worker_id)
    except NotFoundError:
        return None
    return json.loads(entry.value) if entry.value else None


async def folded(js: JetStreamContext, worker_id: str, seq: int) -> dict[str, Any] | None:
    """The record once the event at stream sequence `seq` (or a later one) is in it."""
    rec = await record(js, worker_id)
    return rec if rec is not None and rec["event_seq"] >= seq else None


async def projected(
    js: JetStreamContext, registry: app.Registry, worker_id: str, seq: int
) -> dict[str, Any]:
    """The record once the projector has taken stream sequence `seq` (applied, ignored or
    rejected: an event that changes nothing leaves no mark on the record)."""
    await eventually(lambda: registry.projector.counters.last_seq >= seq)
    rec = await record(js, worker_id)
    assert rec is not None, f"no record of {worker_id}"
    return rec


def late_body(worker_id: str, last_heartbeat: str, late_after_s: float) -> dict[str, Any]:
    return {
        "v": 1,
        "worker_id": worker_id,
        "last_heartbeat": last_heartbeat,
        "late_after_s": late_after_s,
        "detected_at": rfc3339(),
    }


async def last_availability(js: JetStreamContext, worker_id: str) -> dict[str, Any]:
    msg = await js.get_last_msg(AVAILABILITY, f"worker.available.{worker_id}")
    assert msg.data is not None
    return json.loads(msg.data)


async def expired_events(js: JetStreamContext) -> int:
    """How many worker.expired.* events WORKER_EVENTS holds."""
    info = await js.stream_info(EVENTS, subjects_filter="worker.expired.*")
    return sum((info.state.subjects or {}).values())


def stored_time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


class Beater:
    """Heartbeats for some workers every `interval_s`, as their agents would.

    `sent_offset_s` skews the agents' clock (`sent_at`); `rounds` counts the
    rounds published so far and `last` holds each worker's latest PubAck.
    """

    def __init__(
        self,
        js: JetStreamContext,
        workers: dict[str, str],
        interval_s: float,
        sent_offset_s: float = 0.0,
    ) -> None:
        self.js = js
        self.workers = workers
        self.interval_s = interval_s
        self.sent_offset_s = sent_offset_s
        self.rounds = 0
        self.last: dict[str, PubAck] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for wid, inc in self.workers.items():
                body = heartbeat_body(wid, inc, sent_at=rfc3339(offset_s=self.sent_offset_s),
                                      cpu=float(self.rounds % 100))  # fmt: skip
                self.last[wid] = await publish(self.js, "heartbeat", wid, body)
                raise_if_cancelled()  # a PubAck racing the cancel must not keep us beating
            self.rounds += 1
            await asyncio.sleep(self.interval_s)  # the agents' beat, not a wait

    async def until(self, rounds: int, timeout: float = 10.0) -> None:
        """Wait until `rounds` more rounds have been published."""
        target = self.rounds + rounds
        await eventually(lambda: self.rounds >= target, timeout=timeout)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await stop_task(self._task, "the Beater")


# ---------------------------------------------------------------- the registry in-process


@contextlib.asynccontextmanager
async def running_registry(
    url: str, *, caught_up: bool = False, **overrides: Any
) -> AsyncIterator[app.Registry]:
    """Run `serve(RegistrySettings(...))` as a task; yield its Registry; cancel on exit.

    Yields once serve() has provisioned (events may be published); with
    `caught_up`, only once the projector has caught up and the sweeper judges.
    """
    settings = RegistrySettings(nats_url=url, **{"timeout_floor_s": 0.3, **overrides})
    made: list[app.Registry] = []
    ready = asyncio.Event()
    task = asyncio.create_task(
        app.serve(settings, on_ready=lambda _: ready.set(), on_started=made.append)
    )
    waiter = asyncio.ensure_future(ready.wait())
    await asyncio.wait({task, waiter}, timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raise what stopped it
    assert made, "registry did not start within 10 s"
    try:
        if caught_up:
            await asyncio.wait_for(made[0].link.wait_caught_up(), 10.0)
            await eventually(lambda: made[0].sweeper.started, timeout=5.0)
        yield made[0]
    finally:
        await stop_task(task, "serve()")


# ---------------------------------------------------------------- `registry up` as a process


async def registry_cli(url: str, *argv: str) -> tuple[int, str, str]:
    """`registry ARGV --nats URL` in a child process: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "registry.cli", *argv, "--nats", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def registry_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "registry.cli", "up", *args]


class RegistryProcess:
    """`registry up ...` in a child process; stderr (JSON log lines) goes to a file.

    `command` replaces `python -m registry.cli up` (e.g. an installed console script)."""

    def __init__(
        self, args: list[str], log_path: Path, command: list[str] | None = None,
        cwd: Path | None = None,
    ) -> None:  # fmt: skip
        self.command = [*(command or registry_command()), *args]
        self.log_path = log_path
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> RegistryProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NATS_URL", None)
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, at once
            self.proc = await asyncio.create_subprocess_exec(
                *self.command, stdout=asyncio.subprocess.PIPE, stderr=log,
                stdin=asyncio.subprocess.DEVNULL, env=env, cwd=self.cwd,
            )  # fmt: skip
        return self

    async def first_line(self, timeout: float = 15.0) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        return line.decode().strip()

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 10.0)

    async def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        """Best effort: never leave a child behind. SIGTERM first, so that a `registry up`
        stops the nats-server it embeds (SIGKILL would orphan it), then SIGKILL."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10.0)
            except TimeoutError:
                self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), 10.0)


@contextlib.asynccontextmanager
async def registry_process(
    args: list[str], log_path: Path, command: list[str] | None = None, cwd: Path | None = None
) -> AsyncIterator[RegistryProcess]:
    proc = await RegistryProcess(args, log_path, command, cwd).start()
    try:
        yield proc
    finally:
        await proc.close()
