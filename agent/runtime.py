"""The agent's own thread: event loop, NATS connection, register, beat, obey, leave.

Heartbeats must not depend on the host application's event loop being free: a
worker busy with a 30-second CPU-bound job (or a blocking call) must keep
beating. So the agent runs its own event loop on a dedicated thread with its
own NATS connection. `AgentThread` is that thread; the public `Agent`
(agent/agent.py) drives it from the host through the few methods marked
"host side", which are thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from agent.connection import Connection
from agent.drain import DrainState
from agent.probe import Prober
from agent.publish import error_text, publish_event
from agent.settings import AgentSettings, build_registration
from agent.tasks import TaskStats
from registry import protocol
from registry.cancel import raise_if_cancelled
from registry.protocol import WorkerStatus

T = TypeVar("T")

MIN_BEAT_GAP_S: Final = 0.05  # immediate beats (a slot filled or freed) never come faster


class AgentError(RuntimeError):
    """The agent cannot go on (e.g. it was stopped, or its registration was refused)."""


class AgentCutOff(AgentError):
    """The server ended the connection for good (credentials revoked or expired, or
    another refusal): nothing more can be said, not even an unregister."""


class AgentSuperseded(AgentError):
    """Another process registered this worker id: this one stopped beating and did not
    unregister (the id is the other process's now)."""


def _settle(future: concurrent.futures.Future[None], error: BaseException | None) -> None:
    """Resolve a cross-thread future once; a waiter may have cancelled it."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


class AgentThread:
    """The agent's event loop, thread and NATS connection. `start`, `request_stop`,
    `submit`, `beat_soon` and `join` are for the host (thread-safe); everything
    else runs on the agent's own loop (the host reaches it through `submit`)."""

    def __init__(self, settings: AgentSettings, worker_id: str, incarnation: str,
                 prober: Prober, stats: TaskStats, drain: DrainState) -> None:  # fmt: skip
        self.s, self.worker_id, self.incarnation = settings, worker_id, incarnation
        self.prober, self.stats, self.drain = prober, stats, drain
        self.leave_reason = "shutdown"
        self.status = WorkerStatus.ONLINE
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.loop = asyncio.new_event_loop()
        self.log = structlog.get_logger("agent").bind(worker_id=worker_id, incarnation=incarnation)
        self._thread = threading.Thread(target=self._main, name=f"agent-{worker_id}", daemon=True)
        self._task: asyncio.Task[None] | None = None
        self._stop_requested = self._registered = False
        self._conn: Connection | None = None
        self._js: JetStreamContext | None = None
        self._send_lock = asyncio.Lock()
        self._last_beat = 0.0  # agent-loop time of the latest heartbeat
        self._beat_now = asyncio.Event()  # beat as soon as the minimum gap allows
        self._reregister = asyncio.Event()
        self.superseded: AgentSuperseded | None = None
        self.cut_off: AgentCutOff | None = None

    # ------------------------------------------------------------ host side

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._call_soon(self._stop)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def beat_soon(self) -> None:
        """Ask for a heartbeat now; requests coalesce into one beat (any thread)."""
        self._call_soon(self._beat_now.set)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _call_soon(self, callback: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the thread has ended
            self.loop.call_soon_threadsafe(callback)

    # ------------------------------------------------------------ lifecycle

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        error: BaseException | None = None
        try:
            self.loop.run_until_complete(self._run())
        except asyncio.CancelledError:
            error = self.superseded or self.cut_off  # None after a stop the host asked for
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
        conn = self._conn = Connection(self.s, self.worker_id, self.log, self._cut_off)
        await conn.open()
        try:
            await self._live(conn)
        finally:
            await self._leave(conn)

    async def _live(self, conn: Connection) -> None:
        self._js = conn.nc.jetstream()
        await conn.nc.subscribe(protocol.control_subject(self.worker_id), cb=self._on_control)
        if not await self._register(budget_s=None):
            raise AgentError("the server refused the registration (see event_rejected)")
        raise_if_cancelled()  # a stop that raced the PubAck
        _settle(self.ready, None)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._beat_loop())
            tg.create_task(self._control_loop())

    async def _leave(self, conn: Connection) -> None:
        """Heartbeats have stopped; unregister under a timeout, then drain."""
        conn.closing = True
        if self._registered:
            await self._unregister()
        await conn.close()
        self.log.info("agent_stopped")

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
            if self.stats.snapshot().active or self.status is not WorkerStatus.ONLINE:
                self._beat_now.set()  # a registration may fold to "online, idle": correct it
        return stored

    async def heartbeat(self) -> bool:
        """Sample and publish one heartbeat; False (logged) when it was not stored.

        While disconnected, beats are skipped rather than buffered: a burst of
        stale beats after the reconnect would tell the registry nothing.
        """
        async with self._send_lock:
            self._last_beat = asyncio.get_running_loop().time()
            if self._conn is None or not self._conn.is_connected:
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
            reason=self.leave_reason,
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
        """Beat one interval after the latest beat (a `set_status` beat resets the
        tick), or as soon as `beat_soon` asks, but never within MIN_BEAT_GAP_S of
        the latest beat. The loop awaits each beat, so at most one is in flight;
        requests made meanwhile coalesce into the next one."""
        loop = asyncio.get_running_loop()
        interval = self.s.heartbeat_interval_s
        gap = min(MIN_BEAT_GAP_S, interval)
        self._last_beat = loop.time() - random.uniform(0.0, interval)  # spread a fleet
        while True:
            raise_if_cancelled()  # nats-py can swallow a stop that races a PubAck
            wait = self._last_beat + (gap if self._beat_now.is_set() else interval) - loop.time()
            if wait > 0:
                await self._sleep_unless_asked(wait)
                continue
            self._beat_now.clear()
            await self.heartbeat()

    async def _sleep_unless_asked(self, seconds: float) -> None:
        """Sleep; a `beat_soon` request (when none is pending yet) cuts it short."""
        if self._beat_now.is_set():
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._beat_now.wait()

    # ------------------------------------------------------------ control

    async def _on_control(self, msg: Msg) -> None:
        try:
            control = protocol.CONTROL_DECODER.decode(msg.data)
        except msgspec.DecodeError as e:
            self.log.warning("control_undecodable", error=error_text(e))
            return
        if control.action == "register":
            self.log.info("control_register_requested", reason=control.reason)
            self._reregister.set()
        elif control.action == "superseded" and control.incarnation == self.incarnation:
            self._supersede(control.reason)
        elif control.action in ("drain", "uncordon") and control.incarnation == self.incarnation:
            if self.drain.set(control.action == "drain", control.reason):
                event = "agent_draining" if control.action == "drain" else "agent_drain_lifted"
                self.log.warning(event, reason=control.reason)
        else:
            self.log.info("control_ignored", action=control.action, reason=control.reason)

    def _supersede(self, reason: str) -> None:
        """Stop at once, without unregistering: the worker id is another process's now."""
        if self.superseded is not None:
            return
        self.log.error("agent_superseded", reason=reason)
        self.superseded = AgentSuperseded(f"superseded: {reason}; this process stopped")
        self._registered = False
        if self._task is not None:
            self._task.cancel()

    def _cut_off(self, why: str) -> None:
        """The server closed the connection for good: stop (there is no unregistering)."""
        if self.cut_off is not None or self.superseded is not None:
            return
        self.log.error("agent_cut_off", error=why,
                       hint="the server ended the connection: credentials revoked or expired?")  # fmt: skip
        self.cut_off = AgentCutOff(
            f"the server closed the connection ({why}); this process stopped"
        )
        self._registered = False
        if self._task is not None:
            self._task.cancel()

    async def _control_loop(self) -> None:
        """Register again (same incarnation) when asked; requests close together coalesce."""
        while True:
            raise_if_cancelled()
            await self._reregister.wait()
            await asyncio.sleep(random.uniform(0.0, min(1.0, self.s.heartbeat_interval_s)))
            self._reregister.clear()
            await self._register(budget_s=max(self.s.heartbeat_interval_s, 1.0))
