"""Composition root: connect -> provision -> TaskGroup(projector, sweeper, service) -> drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import nats
import structlog
from nats.aio.client import Client

from registry.cancel import raise_if_cancelled
from registry.embedded import NatsServer
from registry.projector import Projector
from registry.protocol import WorkerInfo
from registry.provision import provision
from registry.service import start_service
from registry.settings import RegistrySettings
from registry.sweep import ServerClock
from registry.sweeper import Sweeper

log = structlog.get_logger("registry.app")


async def connect(url: str, name: str, first_timeout_s: float = 2.0) -> Client:
    """Connect, retrying with backoff while the server is unreachable (and saying so).

    With unlimited reconnects nats-py also retries the *first* connection forever,
    silently, so this loop would never see a failure: the first connection may
    retry once, and unlimited reconnects are switched on once connected.
    """
    backoff = 0.2
    while True:
        nc = Client()
        try:
            await nc.connect(
                url, name=name, connect_timeout=first_timeout_s,  # type: ignore[arg-type]
                max_reconnect_attempts=1,
                reconnect_time_wait=0.5, allow_reconnect=True,  # type: ignore[arg-type]
                disconnected_cb=_on_disconnected(nc, url),
                reconnected_cb=_on_reconnected(url),
                error_cb=_error_cb,
            )  # fmt: skip
        except (OSError, nats.errors.Error, TimeoutError) as e:
            log.warning("nats_unreachable", url=url, error=str(e) or type(e).__name__,
                        retry_in_s=round(backoff, 1))  # fmt: skip
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            continue
        nc.options["max_reconnect_attempts"] = -1  # connected: from now on, reconnect forever
        return nc


def _on_disconnected(nc: Client, url: str) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        if not nc.is_closed:  # our own drain or close is not news
            log.warning("nats_disconnected", url=url)

    return cb


def _on_reconnected(url: str) -> Callable[[], Awaitable[None]]:
    async def cb() -> None:
        log.info("nats_reconnected", url=url)

    return cb


async def _error_cb(e: Exception) -> None:
    log.debug("nats_error", error=str(e) or type(e).__name__)


@contextlib.asynccontextmanager
async def nats_endpoint(settings: RegistrySettings) -> AsyncIterator[str]:
    """The URL to use: the given one, or an embedded server for the block's lifetime."""
    if settings.nats_url is not None:
        yield settings.nats_url
        return
    server = NatsServer(settings.data_dir, port=settings.port or -1)
    url = await asyncio.to_thread(server.start)
    log.info("embedded_server_started", url=url, data_dir=str(settings.data_dir))
    try:
        yield url
    finally:
        await asyncio.to_thread(server.stop)
        log.info("embedded_server_stopped")


class Registry:
    """Projector + sweeper over one connection; `records()`/`counters()` feed the service."""

    def __init__(self, nc: Client, settings: RegistrySettings) -> None:
        self.clock = ServerClock()
        self.projector = Projector(nc, settings, self.clock)
        self.sweeper = Sweeper(
            nc, settings, self.clock, self.projector.records, self.projector.caught_up
        )
        self.projector.on_change = self.sweeper.observe
        self.projector.on_reset = self.sweeper.reset

    def records(self) -> Mapping[str, WorkerInfo]:
        return self.projector.records()

    def counters(self) -> dict[str, int | float]:
        s = self.sweeper
        return {
            **self.projector.stats(),
            "expiries_published": s.expiries_published,
            "lates_published": s.lates_published,
            "expiries_held": s.expiries_held,
            "brake_engaged": int(s.brake_engaged),
        }

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.projector.run(), name="projector")
            tg.create_task(self.sweeper.run(), name="sweeper")


async def serve(
    settings: RegistrySettings,
    on_ready: Callable[[str], None] = lambda url: None,
    on_started: Callable[[Registry], None] = lambda registry: None,
) -> None:
    """Run the registry until cancelled; stops everything it started.

    `on_ready(url)` once provisioned (events may flow); `on_started(registry)`
    hands embedders and tests the running Registry (counters, records).
    """
    async with nats_endpoint(settings) as url:
        nc = await connect(url, "worker-registry", settings.connect_timeout_s)
        try:
            await provision(nc, replicas=settings.replicas)
            registry = Registry(nc, settings)
            service = await start_service(nc, registry) if settings.service else None
            try:
                raise_if_cancelled()  # a stop that raced a provisioning reply
                on_started(registry)
                on_ready(url)
                log.info("registry_running", url=url)
                await registry.run()
            finally:
                if service is not None:
                    with contextlib.suppress(Exception):
                        await service.stop()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5.0)
