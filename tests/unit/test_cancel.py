"""A stop must stop a loop even when a reply swallowed the cancel.

On Python 3.11 `asyncio.wait_for` returns the result when it arrives in the same
loop iteration as a cancel; nats-py awaits every reply (PubAck, API answer) that
way. A loop that carries on after such a call never stops: the registry's
TaskGroup, the agent's `stop()` and SIGTERM all wait for it. `racing_reply`
reproduces the race exactly, with no timing involved.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, TypeVar

from agent.drain import DrainState
from agent.probe import Prober
from agent.runtime import AgentThread
from agent.settings import AgentSettings
from agent.tasks import TaskStats
from registry.cancel import raise_if_cancelled
from tests.unit.fakes import FakeNvml

T = TypeVar("T")


async def racing_reply(value: T, cancel: bool = True) -> T:
    """Await a reply the way nats-py does; with `cancel`, the reply and a cancel of
    this task land in the same loop iteration (on 3.11 the cancel is then swallowed)."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    reply: asyncio.Future[T] = loop.create_future()
    loop.call_soon(reply.set_result, value)
    if cancel:
        loop.call_soon(me.cancel)
    return await asyncio.wait_for(reply, 5.0)


async def outcome(task: asyncio.Task[Any]) -> str:
    await asyncio.wait({task}, timeout=2.0)
    if not task.done():
        task.cancel()  # what the code under test failed to honour; this one lands
        await asyncio.wait({task}, timeout=2.0)
        return "still running"
    return "cancelled" if task.cancelled() else "returned"


async def test_raise_if_cancelled_surfaces_a_cancel_a_reply_swallowed() -> None:
    async def loop_body() -> None:
        for n in range(1_000_000):  # the cancel races the first reply only
            await racing_reply(None, cancel=n == 0)
            raise_if_cancelled()
            await asyncio.sleep(0.001)

    assert await outcome(asyncio.create_task(loop_body())) == "cancelled"


async def test_raise_if_cancelled_leaves_an_uncancelled_task_alone() -> None:
    async def body() -> str:
        await asyncio.sleep(0)
        raise_if_cancelled()
        return "went on"

    assert await asyncio.create_task(body()) == "went on"


def agent_thread(tmp_path: Path) -> AgentThread:
    settings = AgentSettings(name="w1", heartbeat_interval_s=0.05, disk_path=str(tmp_path))
    prober = Prober(tmp_path, nvml=FakeNvml([]))
    return AgentThread(settings, "w1", "inc-1", prober, TaskStats(), DrainState())  # never started


async def test_the_agents_beat_loop_stops_when_a_pubAck_swallows_the_stop(tmp_path: Path) -> None:
    thread = agent_thread(tmp_path)
    beats = 0

    async def heartbeat() -> bool:
        nonlocal beats
        beats += 1
        thread._last_beat = asyncio.get_running_loop().time()  # as the real one does
        return await racing_reply(True, cancel=beats == 1)

    thread.heartbeat = heartbeat  # type: ignore[method-assign]
    try:
        assert await outcome(asyncio.create_task(thread._beat_loop())) == "cancelled"
        assert beats == 1
    finally:
        thread.loop.close()


async def test_the_agents_control_loop_stops_when_a_pubAck_swallows_the_stop(
    tmp_path: Path,
) -> None:
    thread = agent_thread(tmp_path)
    registrations = 0

    async def register(budget_s: float | None) -> bool:
        nonlocal registrations
        registrations += 1
        thread._reregister.set()  # asked again meanwhile: the loop would go round
        return await racing_reply(True, cancel=registrations == 1)

    thread._register = register  # type: ignore[method-assign]
    thread._reregister.set()
    try:
        assert await outcome(asyncio.create_task(thread._control_loop())) == "cancelled"
        assert registrations == 1
    finally:
        thread.loop.close()
