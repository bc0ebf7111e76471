"""Composition root: connect -> provision -> TaskGroup(projector, sweeper, service) -> drain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping

import structlog
from nats.aio.client import Client

from registry.cancel import raise_if_cancelled
from registry.catalog import Catalog
from registry.connect import NatsOptions, connect_patiently
from registry.protocol import WorkerInfo
from registry.server.embedded import NatsServer
from registry.server.link import Link
from registry.server.projector import Projector
from registry.server.provision import provision
from registry.server.service import ServiceClient, start_service
from registry.server.settings import RegistrySettings
from registry.server.sweeper import Sweeper
from registry.sweep import ServerClock

log = structlog.get_logger("registry.app")


@contextlib.asynccontextmanager
async def nats_endpoint(settings: RegistrySettings) -> AsyncIterator[str]:
    """The URL to use: the given one, or an embedded server for the block's lifetime."""
    if settings.nats_url is not None:
        yield settings.nats_url
        return
    server = NatsServer(settings.data_dir, port=settings.port or -1, config=settings.server_config)
    url = await asyncio.to_thread(server.start)
    log.info("embedded_server_started", url=url, data_dir=str(settings.data_dir))
    try:
        yield url
    finally:
        await asyncio.to_thread(server.stop)
        log.info("embedded_server_stopped")


class Registry:
    """Projector + sweeper over one connection; `records()`, `catalog()` and `counters()`
    feed the service."""

    def __init__(self, nc: Client, settings: RegistrySettings) -> None:
        self.clock = ServerClock()
        self.link = Link(nc)
        self.projector = Projector(self.link, settings, self.clock)
        self.sweeper = Sweeper(self.link, settings, self.clock, self.projector.records)
        self.projector.on_change = self.sweeper.observe
        self.projector.on_reset = self.sweeper.reset
        self.projector.on_premature = self.sweeper.rejudge

    def records(self) -> Mapping[str, WorkerInfo]:
        return self.projector.records()

    def catalog(self) -> Catalog:
        return self.projector.catalog

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
        options = NatsOptions.of(
            url, "worker-registry", connect_timeout_s=settings.connect_timeout_s,
            auth=settings.auth,
        )  # fmt: skip
        nc = await connect_patiently(options)
        service_nc: Client | None = None
        try:
            await provision(nc, replicas=settings.replicas)
            registry = Registry(nc, settings)
            service = None
            if settings.service:  # its own connection, which publishes replies to inboxes only
                service_nc = await connect_patiently(
                    NatsOptions.of(url, "worker-registry service", auth=settings.auth,
                                   connect_timeout_s=settings.connect_timeout_s),
                    client=ServiceClient,
                )  # fmt: skip
                service = await start_service(service_nc, registry)
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
            for conn in (service_nc, nc):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.drain(), 5.0)
