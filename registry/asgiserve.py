"""Serve an ASGI app with uvicorn for the length of a block: the gateway and /metrics.

The listening socket is ours (`listen`), made before anything else, so a taken
port is one clear OSError rather than uvicorn's SystemExit escaping the event
loop. uvicorn's signal handlers are left out (whoever runs us owns SIGINT and
SIGTERM), and leaving the block tells uvicorn to exit rather than cancelling it:
open requests finish (at most `graceful_s`), idle connections are closed, the
port is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

STOP_WITHIN_S = 5.0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one); OSError naming the address if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class Serving:
    port: int
    task: asyncio.Task[None]

    async def until_stopped(self) -> None:
        """Until uvicorn ends by itself (it does not, unless it fails)."""
        await asyncio.shield(self.task)  # a cancel here is a stop for `serving` to order


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, sock: socket.socket, graceful_s: int = 2,
                  ) -> AsyncIterator[Serving]:  # fmt: skip
    """uvicorn serving `app` on `sock` (which it then owns) for the block."""
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=graceful_s)  # fmt: skip
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise OSError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        yield Serving(int(sock.getsockname()[1]), task)
    finally:
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(task), STOP_WITHIN_S)
        sock.close()
