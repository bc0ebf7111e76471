"""The embeddable agent: register a worker, keep it beating, count its tasks, leave.

Heartbeats must not depend on the host application's event loop being free: a
worker busy with a 30-second CPU-bound job (or a blocking call) must keep
beating. So the agent runs its own event loop on a dedicated thread with its
own NATS connection (`_AgentThread`); the host-side `Agent` hands it requests
thread-safely and counts tasks under a lock.

    async with Agent(nats_url, name="gpu-box-1", capability="gpu") as agent:
        async with agent.task():
            await transcribe(job)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import itertools
import math
import random
import re
import socket
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import urlsplit

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client, Server
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.probe import Prober
from registry import protocol
from registry.protocol import WorkerCapability, WorkerStatus

log = structlog.get_logger("agent")
T = TypeVar("T")

DRAIN_TIMEOUT_S: Final = 2.0
PERMANENT_ERRORS: Final = (
    nats.js.errors.BadRequestError,
    nats.errors.MaxPayloadError,
    nats.errors.BadSubjectError,
    nats.errors.BadHeaderError,
)
TRANSIENT_ERRORS: Final = (nats.errors.Error, asyncio.TimeoutError)
NATS_SCHEMES: Final = frozenset({"nats", "tls", "ws", "wss"})
_UNSAFE_ID_CHARS: Final = re.compile(r"[^A-Za-z0-9_-]+")


class AgentError(RuntimeError):
    """The agent cannot go on (e.g. it was stopped, or its registration was refused)."""


# ---------------------------------------------------------------- settings and identity


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _parse_tags(value: object) -> object:
    """`{"k": "v"}`, or `k=v` strings (a list, or one comma-separated string)."""
    if isinstance(value, Mapping):
        return value
    items = _split_commas(value)
    if not isinstance(items, Iterable):
        return value
    tags: dict[str, str] = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"tag {item!r} is not key=value")
        tags[key.strip()] = val.strip()
    return tags


class AgentSettings(BaseModel):
    """Everything a person configures about an agent, validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nats_url: str = Field(default="nats://127.0.0.1:4222", min_length=1)
    name: str = Field(min_length=1, max_length=256)
    capability: WorkerCapability | None = None  # None: gpu when a GPU is found, else cpu
    worker_id: str | None = None  # None: derived from name and hostname
    max_concurrent_tasks: int = Field(default=1, ge=1, le=1_000_000)
    content_types: tuple[str, ...] = ()  # empty: the capability's defaults
    tags: dict[str, str] = {}
    heartbeat_interval_s: float = Field(default=5.0, gt=0.0, le=86400.0)
    disk_path: str = "."
    port: int = Field(default=8000, ge=0, le=65535)
    publish_timeout_s: float = Field(default=2.0, gt=0.0)
    unregister_timeout_s: float = Field(default=2.0, gt=0.0)
    reconnect_wait_s: float = Field(default=2.0, gt=0.0)
    reconnect_jitter_s: float = Field(default=1.0, ge=0.0)

    @field_validator("nats_url")
    @classmethod
    def _nats_urls(cls, value: str) -> str:
        for url in value.split(","):
            parts = urlsplit(url.strip() if "://" in url else f"nats://{url.strip()}")
            try:
                ok = parts.scheme in NATS_SCHEMES and bool(parts.hostname) and parts.port != 0
            except ValueError:  # a port that is not a number, or out of range
                ok = False
            if not ok:
                raise ValueError("not a NATS URL (expected e.g. nats://127.0.0.1:4222)")
        return value

    @field_validator("disk_path")
    @classmethod
    def _existing_path(cls, value: str) -> str:
        return existing_path(value)

    @field_validator("worker_id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return protocol.validate_worker_id(value)
        except protocol.InvalidWorkerId:
            raise ValueError(
                "use 1-128 characters from A-Z a-z 0-9 _ - (one NATS subject token)"
            ) from None

    @field_validator("content_types", mode="before")
    @classmethod
    def _content_types(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("content_types")
    @classmethod
    def _content_type_length(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(len(t) > 128 for t in value):
            raise ValueError("a content type is longer than 128 characters")
        return value

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: object) -> object:
        return _parse_tags(value)

    @field_validator("tags")
    @classmethod
    def _tag_lengths(cls, value: dict[str, str]) -> dict[str, str]:
        if any(len(k) > 128 or len(v) > 1024 for k, v in value.items()):
            raise ValueError("tag keys are at most 128 characters, values 1024")
        return value

    @property
    def servers(self) -> list[str]:
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]


def existing_path(value: str) -> str:
    if not Path(value).exists():
        raise ValueError(f"no such file or directory: {value}")
    return value


def derive_worker_id(name: str, hostname: str) -> str:
    """A stable id from name and hostname, so a restarted worker keeps its id.

    Characters outside [A-Za-z0-9_-] become '-'; when that (or truncation to
    128) changed anything, a short hash of the original is appended so that
    e.g. `a.b` and `a-b` do not collide.
    """
    raw = f"{name}-{hostname}"
    safe = _UNSAFE_ID_CHARS.sub("-", raw).strip("-") or "worker"
    if safe == raw and len(safe) <= 128:
        return safe
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{safe[:119]}-{digest}"


def build_registration(
    settings: AgentSettings, worker_id: str, prober: Prober
) -> protocol.WorkerRegistration:
    """Probe the machine (blocking) and fill in the capability's defaults."""
    hardware = prober.hardware()
    capability = settings.capability or (
        WorkerCapability.GPU if hardware.gpu_count else WorkerCapability.CPU
    )
    content_types = settings.content_types or protocol.DEFAULT_CONTENT_TYPES[capability]
    return protocol.WorkerRegistration(
        worker_id=worker_id,
        name=settings.name,
        capability=capability,
        hardware=hardware,
        location=prober.location(settings.port),
        max_concurrent_tasks=settings.max_concurrent_tasks,
        supported_content_types=list(content_types),
        tags=dict(settings.tags),
    )


# ---------------------------------------------------------------- task tracking


@dataclass(frozen=True)
class TaskCounts:
    active: int = 0
    completed: int = 0
    failed: int = 0
    avg_duration_s: float = 0.0  # mean duration of completed tasks


class TaskStats:
    """Counters shared by the host (which counts) and the agent thread (which reports)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = self._completed = self._failed = 0
        self._completed_s = 0.0

    def started(self) -> None:
        with self._lock:
            self._active += 1

    def finished(self, duration_s: float, ok: bool) -> None:
        with self._lock:
            self._active -= 1
            if ok:
                self._completed += 1
                self._completed_s += duration_s
            else:
                self._failed += 1

    def snapshot(self) -> TaskCounts:
        with self._lock:
            avg = self._completed_s / self._completed if self._completed else 0.0
            return TaskCounts(self._active, self._completed, self._failed, avg)

    def apply(self, usage: protocol.WorkerMetrics) -> protocol.WorkerMetrics:
        counts = self.snapshot()
        return msgspec.structs.replace(
            usage,
            active_tasks=counts.active,
            completed_tasks=counts.completed,
            failed_tasks=counts.failed,
            avg_task_duration_seconds=round(counts.avg_duration_s, 3),
        )


class TaskScope:
    """One tracked task, for `with` or `async with`; an exception counts it as failed."""

    def __init__(self, stats: TaskStats) -> None:
        self._stats = stats
        self._started = 0.0

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        self._stats.started()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._stats.finished(time.monotonic() - self._started, ok=exc_type is None)

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.__exit__(exc_type)


# ---------------------------------------------------------------- publishing


def _safe_url(url: str) -> str:
    """A server URL without credentials, for logs."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 4222}"


def _error_text(e: BaseException) -> str:
    return str(e) or type(e).__name__


async def publish_event(
    js: JetStreamContext,
    kind: str,
    event: protocol.Event,
    *,
    attempt_timeout_s: float,
    budget_s: float | None,
    logger: Any = log,
) -> bool:
    """JetStream-publish one event and await its PubAck; retry with the SAME msg id.

    Retries transient failures until `budget_s` is spent (None: until it is
    stored). Returns whether the stream stored it; a permanent refusal is
    logged as an error and not retried.
    """
    subject = protocol.event_subject(kind, event.worker_id)
    data = protocol.encode(event)
    msg_id = protocol.new_msg_id()  # one per event: a retry is stored once
    loop = asyncio.get_running_loop()
    deadline = math.inf if budget_s is None else loop.time() + budget_s
    for attempt in itertools.count(1):
        started = loop.time()
        timeout = max(min(attempt_timeout_s, deadline - started), 0.05)
        try:
            ack = await js.publish(subject, data, timeout, headers={"Nats-Msg-Id": msg_id})
        except PERMANENT_ERRORS as e:
            logger.error("event_rejected", kind=kind, error=_error_text(e))
            return False
        except TRANSIENT_ERRORS as e:
            if loop.time() >= deadline:
                logger.warning("publish_failed", kind=kind, attempts=attempt, error=_error_text(e))
                return False
            if budget_s is None and attempt & (attempt - 1) == 0:  # attempts 1, 2, 4, 8, ...
                logger.warning(
                    "publish_retrying", kind=kind, attempts=attempt, error=_error_text(e)
                )
            pause = min(0.1 * 2**attempt, 2.0) * random.uniform(0.5, 1.0) - (loop.time() - started)
            await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
        else:
            logger.debug("event_published", kind=kind, seq=ack.seq, duplicate=ack.duplicate)
            return True
    raise AssertionError("unreachable")


def _settle(future: concurrent.futures.Future[None], error: BaseException | None) -> None:
    """Resolve a cross-thread future once; a waiter may have cancelled it."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


# ---------------------------------------------------------------- the agent's own thread


class _AgentThread:
    """The agent's event loop, thread and NATS connection. Methods starting with
    `_` run on that thread; `start`, `request_stop` and `submit` are for the host."""

    def __init__(self, settings: AgentSettings, worker_id: str, incarnation: str,
                 prober: Prober, stats: TaskStats) -> None:  # fmt: skip
        self.s, self.worker_id, self.incarnation = settings, worker_id, incarnation
        self.prober, self.stats = prober, stats
        self.status = WorkerStatus.ONLINE
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.loop = asyncio.new_event_loop()
        self.log = structlog.get_logger("agent").bind(worker_id=worker_id, incarnation=incarnation)
        self._thread = threading.Thread(target=self._main, name=f"agent-{worker_id}", daemon=True)
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = self._registered = self._connected = self._closing = False
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._send_lock = asyncio.Lock()
        self._last_beat = 0.0  # agent-loop time of the latest heartbeat
        self._reregister = asyncio.Event()

    # ------------------------------------------------------------ host side

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the thread has ended
            self.loop.call_soon_threadsafe(self._stop)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    # ------------------------------------------------------------ lifecycle

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        error: BaseException | None = None
        try:
            self.loop.run_until_complete(self._run())
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # handed to the host through `done`
            error = e
            self.log.error("agent_failed", exc_info=True)
        finally:
            self._close_loop()
            _settle(self.ready, error or AgentError("the agent stopped before it registered"))
            _settle(self.done, error)

    def _close_loop(self) -> None:
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        asyncio.set_event_loop(None)
        self.loop.close()

    def _stop(self) -> None:
        if self._stop_requested:
            return
        self._stop_requested = True
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        self._task = asyncio.current_task()
        if self._stop_requested:
            return
        nc = await self._connect()
        try:
            await self._live(nc)
        finally:
            await self._leave(nc)

    async def _live(self, nc: Client) -> None:
        self._js = nc.jetstream()
        await nc.subscribe(protocol.control_subject(self.worker_id), cb=self._on_control)
        if not await self._register(budget_s=None):
            raise AgentError("the server refused the registration (see event_rejected)")
        _settle(self.ready, None)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._beat_loop())
            tg.create_task(self._control_loop())

    async def _leave(self, nc: Client) -> None:
        """Heartbeats have stopped; unregister under a timeout, then drain."""
        self._closing = True
        if self._registered:
            await self._unregister()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S + 1.0):
                await nc.drain()
        except (nats.errors.Error, TimeoutError):  # reconnecting, closed or stuck
            await nc.close()
        self.log.info("agent_stopped")

    # ------------------------------------------------------------ NATS connection

    async def _connect(self) -> Client:
        nc = self._nc = Client()
        try:
            await nc.connect(**self._connect_options())
        except BaseException:
            self._closing = True
            await nc.close()
            raise
        self._connected = True
        self.log.info("nats_connected", server=self._server())
        return nc

    def _connect_options(self) -> dict[str, Any]:
        return {
            "servers": self.s.servers,
            "name": f"worker-agent {self.worker_id}",
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": self.s.reconnect_wait_s,
            "reconnect_to_server_handler": self._next_server,
            "connect_timeout": 2,
            "drain_timeout": int(DRAIN_TIMEOUT_S),
            "ping_interval": 10,
            "max_outstanding_pings": 2,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }

    def _next_server(self, servers: list[Server], _info: dict[str, Any]) -> tuple[Server, float]:
        """Reconnect to the least-failed server after the wait plus jitter (no herd)."""
        delay = self.s.reconnect_wait_s + random.uniform(0.0, self.s.reconnect_jitter_s)
        return min(servers, key=lambda server: server.reconnects), delay

    def _server(self) -> str:
        url = self._nc.connected_url if self._nc is not None else None
        return f"{url.hostname}:{url.port}" if url is not None else "?"

    async def _on_error(self, e: Exception) -> None:
        if not self._connected:
            self.log.warning(
                "nats_unreachable",
                servers=[_safe_url(u) for u in self.s.servers],
                error=_error_text(e),
                retry_in_s=self.s.reconnect_wait_s,
            )
        elif isinstance(e, OSError | asyncio.TimeoutError | nats.errors.StaleConnectionError):
            self.log.debug("nats_connect_failed", error=_error_text(e))
        else:
            self.log.warning("nats_error", error=_error_text(e))

    async def _on_disconnected(self) -> None:
        if not self._closing:
            self.log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        self.log.info("nats_reconnected", server=self._server())

    # ------------------------------------------------------------ events

    async def _publish(self, kind: str, event: protocol.Event, budget_s: float | None) -> bool:
        assert self._js is not None
        return await publish_event(
            self._js, kind, event,
            attempt_timeout_s=self.s.publish_timeout_s, budget_s=budget_s, logger=self.log,
        )  # fmt: skip

    async def _register(self, budget_s: float | None) -> bool:
        async with self._send_lock:
            registration = await asyncio.to_thread(
                build_registration, self.s, self.worker_id, self.prober
            )
            event = protocol.RegisterEvent(
                worker_id=self.worker_id,
                incarnation=self.incarnation,
                sent_at=protocol.utcnow(),
                registration=registration,
                heartbeat_interval_s=self.s.heartbeat_interval_s,
            )
            stored = await self._publish("register", event, budget_s)
        if stored:
            self._registered = True
            self.log.info("worker_registered", capability=registration.capability.value)
        return stored

    async def heartbeat(self) -> bool:
        """Sample and publish one heartbeat; False (logged) when it was not stored.

        While disconnected, beats are skipped rather than buffered: a burst of
        stale beats after the reconnect would tell the registry nothing.
        """
        async with self._send_lock:
            self._last_beat = asyncio.get_running_loop().time()
            if self._nc is None or not self._nc.is_connected:
                self.log.debug("heartbeat_skipped", reason="disconnected")
                return False
            usage = await asyncio.to_thread(self.prober.usage)
            event = protocol.HeartbeatEvent(
                worker_id=self.worker_id,
                incarnation=self.incarnation,
                sent_at=protocol.utcnow(),
                status=self.status,
                metrics=self.stats.apply(usage),
            )
            return await self._publish("heartbeat", event, max(self.s.heartbeat_interval_s, 0.5))

    async def set_status(self, status: WorkerStatus) -> bool:
        self.status = status
        self.log.info("status_changed", status=status.value)
        return await self.heartbeat()

    async def _unregister(self) -> None:
        event = protocol.UnregisterEvent(
            worker_id=self.worker_id,
            incarnation=self.incarnation,
            sent_at=protocol.utcnow(),
            reason="shutdown",
        )
        budget = self.s.unregister_timeout_s
        try:
            async with asyncio.timeout(budget), self._send_lock:
                stored = await self._publish("unregister", event, budget)
        except TimeoutError:
            stored = False
        if stored:
            self.log.info("worker_unregistered")
        else:
            self.log.warning("unregister_not_stored", timeout_s=budget)

    async def _beat_loop(self) -> None:
        """Beat every interval after the latest beat (a `set_status` beat resets the tick)."""
        await asyncio.sleep(random.uniform(0.0, self.s.heartbeat_interval_s))  # spread a fleet
        loop = asyncio.get_running_loop()
        while True:
            due = self._last_beat + self.s.heartbeat_interval_s - loop.time()
            if due > 0:
                await asyncio.sleep(due)
            else:
                await self.heartbeat()

    # ------------------------------------------------------------ control

    async def _on_control(self, msg: Msg) -> None:
        try:
            control = protocol.CONTROL_DECODER.decode(msg.data)
        except msgspec.DecodeError as e:
            self.log.warning("control_undecodable", error=_error_text(e))
            return
        if control.action == "register":
            self.log.info("control_register_requested", reason=control.reason)
            self._reregister.set()
        else:
            self.log.info("control_ignored", action=control.action, reason=control.reason)

    async def _control_loop(self) -> None:
        """Register again (same incarnation) when asked; requests close together coalesce."""
        while True:
            await self._reregister.wait()
            await asyncio.sleep(random.uniform(0.0, min(1.0, self.s.heartbeat_interval_s)))
            self._reregister.clear()
            await self._register(budget_s=max(self.s.heartbeat_interval_s, 1.0))


# ---------------------------------------------------------------- the public face


class Agent:
    """An embeddable worker agent. Options are the fields of `AgentSettings`.

    Entering registers the worker (waiting until the registration is stored);
    leaving stops heartbeats, publishes the unregister event under a timeout
    and drains the connection. Heartbeats run on the agent's own thread, so a
    blocked host event loop does not stop them.
    """

    def __init__(self, nats_url: str, /, *, prober: Prober | None = None, **options: Any) -> None:
        self.settings = AgentSettings(nats_url=nats_url, **options)
        self.worker_id = self.settings.worker_id or derive_worker_id(
            self.settings.name, socket.gethostname()
        )
        self.incarnation = protocol.new_incarnation()
        self._prober = prober or Prober(self.settings.disk_path)
        self._stats = TaskStats()
        self._status = WorkerStatus.ONLINE
        self._thread: _AgentThread | None = None

    @classmethod
    def from_settings(cls, settings: AgentSettings, *, prober: Prober | None = None) -> Agent:
        options = settings.model_dump(exclude={"nats_url"})
        return cls(settings.nats_url, prober=prober, **options)

    @property
    def status(self) -> WorkerStatus:
        return self._status

    @property
    def tasks(self) -> TaskCounts:
        return self._stats.snapshot()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._thread.done.done()

    def task(self) -> TaskScope:
        """Track one task: `async with agent.task(): ...` (or plain `with`)."""
        return TaskScope(self._stats)

    async def start(self) -> None:
        """Start the agent thread and wait until the registration is stored."""
        if self._thread is not None:
            raise AgentError("this agent was already started")
        self._thread = _AgentThread(
            self.settings, self.worker_id, self.incarnation, self._prober, self._stats
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(self._thread.ready)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop heartbeats, unregister (bounded), drain. Harmless to repeat."""
        thread = self._thread
        if thread is None:
            return
        thread.request_stop()
        budget = self.settings.unregister_timeout_s + DRAIN_TIMEOUT_S + 1.0
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(thread.done)), budget)
        except TimeoutError:
            log.warning("agent_stop_timeout", worker_id=self.worker_id, timeout_s=budget)
            return
        except Exception:  # the agent thread logged it (agent_failed)
            pass
        await asyncio.to_thread(thread.join, 1.0)
        self._prober.close()

    async def set_status(self, status: WorkerStatus | str) -> bool:
        """Change the reported status and send a heartbeat now; True if it was stored."""
        status = WorkerStatus(status)
        if status is WorkerStatus.OFFLINE:
            raise ValueError("'offline' is the registry's verdict; stop the agent to leave")
        thread = self._running_thread()
        self._status = status
        return await asyncio.wrap_future(thread.submit(thread.set_status(status)))

    def _running_thread(self) -> _AgentThread:
        if self._thread is None or self._thread.done.done():
            raise AgentError("the agent is not running")
        return self._thread

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
