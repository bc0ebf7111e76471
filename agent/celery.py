"""Celery workers that register themselves with the registry, and routing to them.

    app = Celery("proj", broker="redis://...")
    register_fleet(app, nats_url="nats://registry:4222", capability="gpu",
                   content_types=["video", "image"])

Every `celery worker` of that app then runs one `Agent` in its main process:
it registers when the worker is ready (name: the nodename, worker id derived
from it), counts the tasks the worker runs (in pool children too), reports
"maintenance" when a shutdown begins and unregisters once the worker has
stopped. Each worker also consumes a queue of its own, `worker.<worker id>`,
so `route_task(router, task, ...)` can send a task to exactly the worker the
registry's router picked.

Options are `AgentSettings` fields, taken from `app.conf.worker_registry` (a
mapping) and then from `register_fleet`'s keywords. Only this module imports
celery: `import agent` does not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import sys
import threading
import time
from collections.abc import Coroutine, Iterable, Mapping, MutableMapping
from typing import Any, Final

import structlog
from celery import Celery, Task, current_app, signals
from celery.concurrency.solo import TaskPool as SoloPool
from celery.result import AsyncResult
from celery.worker import state as worker_state
from pydantic import ValidationError

from agent.agent import Agent
from agent.connection import DRAIN_TIMEOUT_S
from agent.settings import AgentSettings, derive_worker_id
from agent.tasks import TaskScope
from registry import protocol
from registry.router import Router

__all__ = ["CONFIG_KEY", "NoWorkerAvailable", "register_fleet", "route_task", "worker_id_for",
           "worker_queue"]  # fmt: skip

log = structlog.get_logger("agent.celery")

CONFIG_KEY: Final = "worker_registry"  # app.conf.worker_registry = {...}
QUEUE_PREFIX: Final = "worker."
# what pool children tell the worker's main process, one datagram each: kind + task id
STARTED, SUCCEEDED, FAILED, STOP = b"+", b".", b"!", b"\x00"
CHILD_SEND_TIMEOUT_S: Final = 0.25  # a stalled main process never holds a task up longer


class NoWorkerAvailable(LookupError):
    """The router knows no available worker for the job (all busy, or none can take it)."""

    def __init__(self, capability: str | None, content_type: str | None) -> None:
        super().__init__(
            f"no available worker for capability={capability!r} content_type={content_type!r}"
        )
        self.capability, self.content_type = capability, content_type


class _TaskFailed(Exception):
    """Stands for the exception a task ended with, for `TaskScope` (failed, not completed)."""


def worker_id_for(nodename: str) -> str:
    """The worker id of a Celery nodename: `celery@gpu-1` -> `celery-gpu-1` (characters
    outside [A-Za-z0-9_-] become `-`, plus a short hash of the nodename when any did)."""
    name, at, host = nodename.partition("@")
    return derive_worker_id(name, host) if at else derive_worker_id("celery", nodename)


def worker_queue(worker_id: str) -> str:
    """The queue only that worker consumes: `worker.<worker id>`."""
    return QUEUE_PREFIX + worker_id


def route_task(
    router: Router,
    task: Task | str,
    capability: protocol.WorkerCapability | str | None = None,
    content_type: str | None = None,
    *,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    app: Celery | None = None,
    **options: Any,
) -> AsyncResult:
    """Pick a worker with `router.pick(capability, content_type)` and send the task to its
    own queue; raise NoWorkerAvailable when nobody can take it now.

    `task` is a task or a task's name (sent with `app.send_task`, the current app by
    default); `options` go to `apply_async`. Call it where the router runs (its event
    loop's thread): `pick()` is not thread-safe. The router holds one of the worker's
    slots until the worker's next availability update, `router.release(worker_id)`,
    or the router's hold_s."""
    picked = router.pick(capability, content_type)
    if picked is None:
        raise NoWorkerAvailable(None if capability is None else str(capability), content_type)
    queue = worker_queue(picked.worker_id)
    try:
        if isinstance(task, str):
            sender = app or current_app
            return sender.send_task(task, args=tuple(args), kwargs=kwargs, queue=queue, **options)
        return task.apply_async(tuple(args), kwargs, queue=queue, **options)
    except BaseException:
        router.release(picked.worker_id)  # it never went out
        raise


def register_fleet(app: Celery, **options: Any) -> None:
    """Make every `celery worker` of `app` register itself with the registry.

    `options` are `AgentSettings` fields (`nats_url`, `capability`, `content_types`,
    `tags`, `heartbeat_interval_s`, ...); they override `app.conf.worker_registry`.
    Defaults: `nats_url` from NATS_URL, `name` the worker's nodename, the worker id
    derived from the nodename, `max_concurrent_tasks` the worker's concurrency (1 for
    the solo pool). Values are checked when a worker starts: a bad one is one line on
    stderr and the worker exits with code 2."""
    unknown = sorted(set(options) - set(AgentSettings.model_fields))
    if unknown:
        raise TypeError(f"register_fleet: unknown option(s) {', '.join(unknown)}")
    if getattr(app, "_worker_registry_fleet", None) is not None:
        raise RuntimeError(f"register_fleet was already called for the app {app.main!r}")
    fleet = _Fleet(app, options)
    app._worker_registry_fleet = fleet
    fleet.connect()


def _config_error(error: ValidationError) -> str:
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{CONFIG_KEY}: unknown option {field!r}"
    message = str(first["msg"]).removeprefix("Value error, ")
    if not field:
        return f"{CONFIG_KEY}: {message}"
    return f"{CONFIG_KEY}: invalid {field} {first.get('input')!r}: {message}"


def _line(_: Any, __: str, event: MutableMapping[str, Any]) -> str:
    """`event key=value ...`, for Celery's log format to wrap."""
    name = event.pop("event", "")
    return " ".join([str(name), *(f"{key}={value}" for key, value in sorted(event.items()))])


def _log_through_celery() -> None:
    """Unless the application configured structlog itself, the agent's events go to the
    stdlib loggers `agent...`, so Celery's handlers, format and `-l` level apply."""
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            structlog.processors.format_exc_info,
            _line,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _max_tasks(worker: Any) -> int:
    """The most tasks the worker runs at once: 1 for solo, else its (maximum) concurrency."""
    pool = worker.pool_cls
    if isinstance(pool, type) and issubclass(pool, SoloPool):
        return 1
    most = getattr(worker, "max_concurrency", None) or worker.concurrency or 1
    return max(1, min(int(most), protocol.MAX_SLOTS))


class _Fleet:
    """The signal receivers of one app; the worker (if this process is one) is `member`."""

    def __init__(self, app: Celery, options: Mapping[str, Any]) -> None:
        self.app, self.options = app, dict(options)
        self.member: _Member | None = None

    def connect(self) -> None:
        signals.celeryd_init.connect(self._on_init, weak=False)
        signals.celeryd_after_setup.connect(self._on_setup, weak=False)
        signals.worker_ready.connect(self._on_ready, weak=False)
        signals.task_prerun.connect(self._on_prerun, weak=False)
        signals.task_postrun.connect(self._on_postrun, weak=False)
        signals.task_failure.connect(self._on_failure, weak=False)
        signals.task_revoked.connect(self._on_revoked, weak=False)
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)
        signals.worker_shutdown.connect(self._on_shutdown, weak=False)

    def settings(self, nodename: str) -> AgentSettings:
        """Defaults < app.conf.worker_registry < register_fleet's options; raises
        ValidationError (or TypeError for a configuration that is not a mapping)."""
        conf = self.app.conf.get(CONFIG_KEY) or {}
        if not isinstance(conf, Mapping):
            raise TypeError(f"{CONFIG_KEY} must be a mapping, not {type(conf).__name__}")
        merged: dict[str, Any] = {"name": nodename}
        if os.environ.get("NATS_URL"):
            merged["nats_url"] = os.environ["NATS_URL"]
        settings = AgentSettings(**{**merged, **conf, **self.options})
        if settings.own_worker_id is None:  # neither given nor the credentials' own
            settings = settings.model_copy(update={"worker_id": worker_id_for(nodename)})
        return settings

    # ------------------------------------------------------------ the worker's main process

    def _on_init(self, sender: str, instance: Any, **_: Any) -> None:
        """celeryd_init (before the banner): check the configuration; exit 2 when bad."""
        if instance.app is not self.app:
            return
        try:
            settings = self.settings(sender)
        except (ValidationError, TypeError) as e:
            text = _config_error(e) if isinstance(e, ValidationError) else str(e)
            print(f"celery worker {sender}: {text}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        _log_through_celery()
        self.member = _Member(self.app, sender, settings)

    def _on_setup(self, sender: str, instance: Any, **_: Any) -> None:
        """celeryd_after_setup (queues chosen, pool not started): add the worker's queue."""
        if self.member is not None and instance.app is self.app:
            self.member.set_up(instance)

    def _on_ready(self, sender: Any, **_: Any) -> None:
        if self.member is not None and sender.app is self.app:
            self.member.start()

    def _on_shutting_down(self, sender: str, **_: Any) -> None:
        if self.member is not None and sender == self.member.nodename:
            self.member.leaving()

    def _on_shutdown(self, sender: Any, **_: Any) -> None:
        if self.member is not None and sender.app is self.app:
            self.member.stop()

    # ------------------------------------------------------------ tasks (any process)

    def _on_prerun(self, sender: Any, task_id: str, **_: Any) -> None:
        if self.member is not None and sender.app is self.app:
            self.member.tell(STARTED, task_id)

    def _on_postrun(self, sender: Any, task_id: str, state: str | None = None, **_: Any) -> None:
        if self.member is not None and sender.app is self.app:
            self.member.tell(SUCCEEDED if state == "SUCCESS" else FAILED, task_id)

    def _on_failure(self, sender: Any, task_id: str, **_: Any) -> None:
        """Also sent by the main process for a task whose child died or hit its hard time
        limit (no task_postrun then). A child's own failures come with task_postrun."""
        if self.member is not None and self.member.is_main and sender.app is self.app:
            self.member.tell_after_children(FAILED, task_id)

    def _on_revoked(self, sender: Any, request: Any, **_: Any) -> None:
        """Main process: a revoked task (terminated: its child was killed) has ended."""
        if self.member is not None and self.member.is_main and sender.app is self.app:
            self.member.tell_after_children(FAILED, request.id)


class _Member:
    """This worker's agent and counts; lives in the worker's main process, and (copied by
    fork) in its pool children, which only `tell` the main process about tasks."""

    def __init__(self, app: Celery, nodename: str, settings: AgentSettings) -> None:
        self.app, self.nodename, self.settings = app, nodename, settings
        self.main_pid = os.getpid()
        self.agent: Agent | None = None
        self.queues: list[str] = []
        self._open: dict[str, TaskScope] = {}  # task id -> its scope, main process only
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._inbox, self._outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outbox.settimeout(CHILD_SEND_TIMEOUT_S)
        self._host: _HostLoop | None = None
        self._stopped = False

    @property
    def is_main(self) -> bool:
        return os.getpid() == self.main_pid

    def set_up(self, worker: Any) -> None:
        if "max_concurrent_tasks" not in self.settings.model_fields_set:
            update = {"max_concurrent_tasks": _max_tasks(worker)}
            self.settings = self.settings.model_copy(update=update)
        worker_id = self.settings.own_worker_id
        assert worker_id is not None  # settings() made sure
        self.app.amqp.queues.select_add(worker_queue(worker_id))
        self.queues = list(self.app.amqp.queues.consume_from)
        self.agent = Agent.from_settings(self.settings)

    def start(self) -> None:
        """worker_ready: register in the background (the worker does not wait for NATS)."""
        agent = self.agent
        if agent is None or self._host is not None:
            return
        threading.Thread(target=self._read_inbox, name="worker-registry-tasks", daemon=True).start()
        self._host = _HostLoop()
        agent.on_drain(self.drain_changed)
        self._host.submit(agent.start()).add_done_callback(self._started)

    def _started(self, future: concurrent.futures.Future[None]) -> None:
        if not self._stopped and not future.cancelled() and future.exception() is not None:
            log.error("fleet_registration_failed", worker=self.nodename,
                      error=str(future.exception()))  # fmt: skip

    def leaving(self) -> None:
        """worker_shutting_down (in a signal handler): tell routers at once to send nothing
        more, while running tasks finish; never blocks."""
        if self.agent is not None and self._host is not None and self.agent.running:
            self._host.submit(self.agent.set_status("maintenance"))

    def stop(self) -> None:
        """worker_shutdown (tasks have finished): unregister, bounded; harmless to repeat."""
        if self._stopped or not self.is_main:
            return
        self._stopped = True
        host, agent = self._host, self.agent
        if host is not None and agent is not None:
            budget = self.settings.unregister_timeout_s + DRAIN_TIMEOUT_S + 2.0
            try:
                reason = "drained" if agent.draining else "shutdown"
                host.submit(agent.stop(reason=reason)).result(budget)
            except concurrent.futures.TimeoutError:
                log.warning("fleet_stop_timeout", worker=self.nodename, timeout_s=budget)
            host.close()
        self._send(STOP, "")

    # ------------------------------------------------------------ counting

    def tell(self, kind: bytes, task_id: str) -> None:
        """A task started or ended: counted here in the main process (solo, threads), or
        sent to it from a pool child."""
        if self.is_main:
            self._count(kind, task_id)
        else:
            self._send(kind, task_id)

    def tell_after_children(self, kind: bytes, task_id: str) -> None:
        """From the main process, about a task a child may have told of: through the same
        socket, so it is counted after what the child sent before it died."""
        self._send(kind, task_id)

    def _send(self, kind: bytes, task_id: str) -> None:
        try:
            self._outbox.send(kind + task_id.encode())
        except OSError as e:  # the main process is stalled or gone: lose one count
            log.warning("fleet_count_lost", worker=self.nodename, task_id=task_id, error=str(e))

    def _read_inbox(self) -> None:
        while True:
            data = self._inbox.recv(65536)
            kind, task_id = data[:1], data[1:].decode(errors="replace")
            if kind == STOP:
                return
            try:
                self._count(kind, task_id)
            except Exception:  # counting must go on for the next task
                log.exception("fleet_count_failed", worker=self.nodename, task_id=task_id)

    def _count(self, kind: bytes, task_id: str) -> None:
        agent = self.agent
        if agent is None:
            return
        with self._lock:
            if kind == STARTED and task_id not in self._open:
                scope = self._open[task_id] = agent.task()
                scope.__enter__()
            elif kind != STARTED and (ended := self._open.pop(task_id, None)) is not None:
                ended.__exit__(None if kind == SUCCEEDED else _TaskFailed)

    # ------------------------------------------------------------ operator drain

    def drain_changed(self, draining: bool, reason: str) -> None:
        """`registry drain ID` (True) or an uncordon (False), from `agent.on_drain`. Called
        on the agent's own thread: the work goes to a thread of its own, so heartbeats go
        on. Draining: stop consuming every queue, then a warm shutdown once no task runs
        (the agent unregisters with reason `drained`); lifted: consume them again."""
        target = self._drain if draining else self._undrain
        threading.Thread(target=target, args=(reason,), name="worker-registry-drain",
                         daemon=True).start()  # fmt: skip

    def _drain(self, reason: str) -> None:
        with self._drain_lock:  # one transition at a time, on the state as it is now
            agent = self.agent
            if agent is None or not agent.draining:
                return
            control, here = self.app.control, [self.nodename]
            for queue in self.queues:
                control.cancel_consumer(queue, destination=here)
            log.info("fleet_draining", worker=self.nodename, reason=reason, queues=self.queues)
            self._wait_idle_then_shut_down(agent)

    def _wait_idle_then_shut_down(self, agent: Agent) -> None:
        control, here = self.app.control, [self.nodename]
        while agent.draining:
            # reserved: prefetched messages too, which a shutdown would hand back unrun
            if agent.tasks.active == 0 and not worker_state.reserved_requests:
                control.shutdown(destination=here)  # warm: Celery waits for what still runs
                return
            time.sleep(0.2)

    def _undrain(self, reason: str) -> None:
        with self._drain_lock:  # after a drain's wait has seen it lifted
            if self.agent is None or self.agent.draining:
                return
            for queue in self.queues:
                self.app.control.add_consumer(queue, destination=[self.nodename])
            log.info("fleet_drain_lifted", worker=self.nodename, reason=reason)


class _HostLoop:
    """An event loop on a thread of its own, for the Agent's async API: Celery's main
    process has no asyncio loop, and its signal handlers must not block."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="worker-registry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(2.0)
