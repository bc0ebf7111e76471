"""Run the gateway: connect to NATS, follow the bucket, serve HTTP with uvicorn; stop cleanly.

Standalone (`registry http`) or beside the registry in one process (`registry up
--http-port`); either way it is cancelled to stop, and uvicorn is told to exit
rather than interrupted, so open requests finish and the port is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from registry.asgiserve import listen, serving
from registry.connect import Auth, NatsOptions, connect_patiently
from registry.http.app import create_asgi
from registry.http.auth import Guard
from registry.http.gateway import Gateway, GatewaySettings

log = structlog.get_logger("registry.http")

LOADED_WITHIN_S = 30.0


class OpenToTheWorld(ValueError):
    """Open mode (no tokens checked) on an address other than loopback, not asked for."""


@dataclass(frozen=True)
class HttpSettings:
    nats_url: str
    host: str = "127.0.0.1"
    port: int = 8080
    auth: Auth = field(default_factory=Auth)
    auth_dir: Path | None = None  # secured: tokens checked against this trust material
    allow_open: bool = False  # open mode on a non-loopback address
    gateway: GatewaySettings = field(default_factory=GatewaySettings)

    def check(self) -> None:
        if self.auth_dir is None and not self.allow_open and not _loopback(self.host):
            raise OpenToTheWorld(
                f"--host {self.host} without --auth-dir would let anyone on the network act "
                "as any worker: pass --auth-dir DIR (tokens checked) or --allow-open"
            )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_http(
    settings: HttpSettings,
    on_ready: Callable[[str], None] = lambda url: None,
    extra_metrics: CollectorRegistry | None = None,
) -> None:
    """Serve until cancelled. `on_ready(url)` once the bucket is loaded and the port open."""
    settings.check()
    guard = Guard(settings.auth_dir)
    sock = listen(settings.host, settings.port)  # first: a taken port is one clear line
    try:
        await _serve(settings, guard, sock, on_ready, extra_metrics)
    finally:
        sock.close()  # serving() closes it too; this is for a failure before it


async def _serve(
    settings: HttpSettings, guard: Guard, sock: socket.socket,
    on_ready: Callable[[str], None], extra_metrics: CollectorRegistry | None,
) -> None:  # fmt: skip
    nc = await connect_patiently(NatsOptions.of(settings.nats_url, "worker-registry http",
                                                auth=settings.auth))  # fmt: skip
    gateway = Gateway(nc, settings.gateway)
    try:
        await gateway.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LOADED_WITHIN_S):
                await gateway.view.loaded.wait()
        app = create_asgi(gateway, guard=guard, extra_metrics=extra_metrics)
        async with serving(app, sock) as served:
            url = f"http://{settings.host}:{served.port}"
            log.info("http_serving", url=url, secured=guard.secured)
            on_ready(url)
            try:
                await served.until_stopped()
            finally:
                gateway.closing.set()  # live feeds end, so that uvicorn can stop at once
    finally:
        await gateway.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), 5.0)
