"""Shared fixtures: a real nats-server per test (about 25 ms to start)."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, overload

import nats
import pytest
from nats.aio.client import Client

from registry.server.embedded import NatsServer

T = TypeVar("T")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.kill()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    yield client
    await client.close()


@overload
async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = ..., interval: float = ...
) -> T: ...


@overload
async def eventually(
    check: Callable[[], T | None], timeout: float = ..., interval: float = ...
) -> T: ...


async def eventually(
    check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02
) -> Any:
    """Poll `check` until it returns a truthy value without raising; bounded."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            last = None
        except Exception as e:  # noqa: BLE001 - reported below
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s") from last
        await asyncio.sleep(interval)


async def stop_task(task: asyncio.Task[Any], what: str, timeout: float = 10.0) -> None:
    """Cancel a helper task and wait for it; raise what it failed with, if anything.

    A task still running `timeout` seconds after the cancel fails the test with
    `what` named: that is a loop that swallowed its cancel (see registry.cancel).
    """
    task.cancel()
    await asyncio.wait({task}, timeout=timeout)
    assert task.done(), f"{what} still running {timeout} s after being cancelled"
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


def port_open(port: int) -> bool:
    """Something listens on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that someone else is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]
