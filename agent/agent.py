"""The embeddable agent: register a worker, keep it beating, count its tasks, leave.

    async with Agent(nats_url, name="gpu-box-1", capability="gpu") as agent:
        async with agent.task():
            await transcribe(job)

`Agent` lives on the host's event loop and only hands requests to its
`AgentThread` (agent/runtime.py), which beats on a loop of its own, so a host
loop blocked by a CPU-bound job does not stop the heartbeats.
"""

from __future__ import annotations

import asyncio
import socket
from types import TracebackType
from typing import Any, Self

import structlog

from agent.connection import DRAIN_TIMEOUT_S
from agent.drain import DrainListener, DrainState
from agent.probe import Prober
from agent.runtime import AgentCutOff, AgentError, AgentSuperseded, AgentThread
from agent.settings import AgentSettings, derive_worker_id
from agent.tasks import TaskCounts, TaskScope, TaskStats
from registry import protocol
from registry.protocol import WorkerStatus

__all__ = ["Agent", "AgentCutOff", "AgentError", "AgentSuperseded"]

log = structlog.get_logger("agent")


class Agent:
    """An embeddable worker agent. Options are the fields of `AgentSettings`.

    Entering registers the worker (waiting until the registration is stored);
    leaving stops heartbeats, publishes the unregister event under a timeout
    and drains the connection. Heartbeats run on the agent's own thread, so a
    blocked host event loop does not stop them.
    """

    def __init__(self, nats_url: str, /, *, prober: Prober | None = None, **options: Any) -> None:
        self.settings = AgentSettings(nats_url=nats_url, **options)
        self.worker_id = self.settings.own_worker_id or derive_worker_id(
            self.settings.name, socket.gethostname()
        )
        self.incarnation = protocol.new_incarnation()
        self._prober = prober or Prober(self.settings.disk_path)
        self._stats = TaskStats(self.settings.max_concurrent_tasks, self._slots_changed)
        self._status = WorkerStatus.ONLINE
        self._drain = DrainState()
        self._thread: AgentThread | None = None

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
        """Track one task: `async with agent.task(): ...` (or plain `with`).

        A start that fills the last free slot, or an end that frees one, sends
        a heartbeat at once, so routers learn of a full worker immediately.
        """
        return TaskScope(self._stats)

    async def start(self) -> None:
        """Start the agent thread and wait until the registration is stored."""
        if self._thread is not None:
            raise AgentError("this agent was already started")
        self._thread = AgentThread(
            self.settings, self.worker_id, self.incarnation, self._prober, self._stats, self._drain
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(self._thread.ready)
        except BaseException:
            await self.stop()
            raise

    # ------------------------------------------------------------ drain

    @property
    def draining(self) -> bool:
        """True while an operator's drain (`registry drain ID`) stands for this process:
        finish what runs, take nothing new. An uncordon makes it False again."""
        return self._drain.draining

    @property
    def drain_reason(self) -> str:
        """Who drained this worker and why, as the registry said it ("" when not draining)."""
        return self._drain.reason

    def on_drain(self, fn: DrainListener) -> None:
        """Call `fn(draining, reason)` when a drain begins (True) or is lifted (False).

        It runs on the agent's own thread (not the host's event loop) and must return
        quickly; hand work to your loop with `loop.call_soon_threadsafe`."""
        self._drain.listen(fn)

    async def drained(self, poll_s: float = 0.2) -> None:
        """Return once this worker is draining and runs no task (then stop the agent:
        `await agent.stop(reason="drained")`)."""
        while not (self._drain.draining and self._stats.snapshot().active == 0):
            await asyncio.sleep(poll_s)

    @property
    def superseded(self) -> bool:
        """True once another process registered this worker id and this agent stopped."""
        return self._thread is not None and self._thread.superseded is not None

    async def wait(self) -> None:
        """Until the agent ends by itself: raises AgentSuperseded when another process
        registered this worker id (heartbeats have stopped), AgentCutOff when the server
        ended the connection for good (credentials revoked or expired), AgentError for
        any other end; returns when stop() ended it."""
        thread = self._thread
        if thread is None:
            raise AgentError("the agent was not started")
        # shielded: a cancelled wait must not cancel the thread's own `done`
        await asyncio.shield(asyncio.wrap_future(thread.done))

    async def stop(self, reason: str = "shutdown") -> None:
        """Stop heartbeats, unregister (bounded, with `reason`), close the connection.
        Harmless to repeat."""
        thread = self._thread
        if thread is None:
            return
        thread.leave_reason = reason
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

    def _slots_changed(self) -> None:
        """From TaskStats, on the counting thread: the worker became full or free."""
        thread = self._thread
        if thread is not None:
            thread.beat_soon()

    def _running_thread(self) -> AgentThread:
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
