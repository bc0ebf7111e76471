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
from registry.server.brake import answer_brake
from registry.server.embedded import NatsServer
from registry.server.follower import Follower
from registry.server.lease import LeaseKeeper, LeaseLost, instance_name
from registry.server.link import Link
from registry.server.metrics import Latencies, registry_metrics
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
    """One registry process: active (projector + sweeper) while it holds the lease, a
    standby following the bucket otherwise. `records()`, `catalog()`, `counters()` and
    `lease()` feed the service and the metrics, from whichever of the two is current."""

    def __init__(self, nc: Client, settings: RegistrySettings) -> None:
        self.clock = ServerClock()
        self.link = Link(nc)
        self.latencies = Latencies()  # histograms; the other metrics are read when scraped
        self.metrics_port: int | None = None  # where /metrics is served, if it is
        self.projector = Projector(self.link, settings, self.clock,
                                   on_written=self.latencies.event_to_bucket.observe)  # fmt: skip
        self.sweeper = Sweeper(self.link, settings, self.clock, self.projector.records,
                               on_detected=self.latencies.detection.observe)  # fmt: skip
        self.projector.on_change = self.sweeper.observe
        self.projector.on_reset = self._projector_reset
        self.projector.on_premature = self.sweeper.rejudge
        self.projector.on_purged = self.sweeper.forget
        self.keeper = LeaseKeeper(nc, settings.instance or instance_name(), settings.lease_ttl_s)
        self.link.fence = self.keeper.fence
        self.keeper.on_failure = self.link.trouble  # a takeover after an outage: outage grace
        self.follower = Follower(nc)
        self._following: asyncio.Task[None] | None = None
        self._projected = False  # the projector has loaded the bucket in this term
        self.terms = 0

    def records(self) -> Mapping[str, WorkerInfo]:
        return self.projector.records() if self._projected else self.follower.records()

    def catalog(self) -> Catalog:
        return self.projector.catalog if self._projected else self.follower.catalog

    @property
    def active(self) -> bool:
        return self.keeper.held

    def counters(self) -> dict[str, int | float]:
        s = self.sweeper
        return {
            **self.projector.stats(),
            "expiries_published": s.expiries_published,
            "lates_published": s.lates_published,
            "expiries_held": s.expiries_held,
            "brake_engaged": int(s.brake_engaged),
            "expiries_released": s.expiries_released,
            "brake_operator_releases": s.operator_releases,
            "active": int(self.active),
            "lease_epoch": self.keeper.epoch if self.active else 0,
            "terms": self.terms,
        }

    def lease(self) -> dict[str, object]:
        """This process's role, and who holds the lease (since when, which epoch)."""
        return self.keeper.describe()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.keeper.run(), name="lease")
                tg.create_task(self._roles(), name="roles")
        finally:
            await self.keeper.release()  # a standby takes over now, not after the TTL

    async def _roles(self) -> None:
        """Stand by until the lease is ours, serve a term while it stays ours; again."""
        while True:
            self._following = asyncio.create_task(self.follower.run(), name="follower")
            try:
                if not self.keeper.held:
                    log.info("registry_standing_by", instance=self.keeper.holder,
                             active=self.keeper.seen.holder if self.keeper.seen else None)  # fmt: skip
                await self.keeper.wait_held()
                await self._term()
            finally:
                await self._stop_following()

    async def _term(self) -> None:
        """Project and sweep until the lease is lost (or the process stops)."""
        epoch = self.keeper.epoch
        self.terms += 1
        self.link.fell_behind()  # nobody is judged before this term's projector caught up
        self.sweeper.reset({})
        log.info("registry_active", epoch=epoch, instance=self.keeper.holder)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.projector.run(), name="projector")
                tg.create_task(self.sweeper.run(), name="sweeper")
                tg.create_task(self._until_lease_lost(), name="lease-watch")
        except* LeaseLost:
            self._projected = False  # the follower answers again
            self.link.fell_behind()
            log.warning("registry_lost_lease", epoch=epoch, instance=self.keeper.holder)

    async def _until_lease_lost(self) -> None:
        await self.keeper.wait_lost()
        raise LeaseLost(f"lease of epoch {self.keeper.epoch} lapsed or taken")

    def _projector_reset(self, records: Mapping[str, WorkerInfo]) -> None:
        """The projector (re)loaded the bucket: it answers from now on; judge afresh."""
        self.sweeper.reset(records)
        self._projected = True
        if self._following is not None:
            self._following.cancel()

    async def _stop_following(self) -> None:
        task, self._following = self._following, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


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
                service = await start_service(
                    service_nc, registry, retention_s=settings.retention_s
                )
                await answer_brake(service_nc, registry)
            try:
                async with registry_metrics(registry, settings.metrics_host, settings.metrics_port):
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
