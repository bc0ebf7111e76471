"""The agent's one NATS connection: reconnect forever with jitter, say what happens.

Lives on the agent's thread. Its callbacks only log; the agent decides what a
disconnect means (heartbeats are skipped while it lasts).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import nats.errors
from nats.aio.client import Client

from agent.publish import error_text
from agent.settings import AgentSettings
from registry.connect import NatsOptions, Reconnect, redact

DRAIN_TIMEOUT_S: Final = 2.0


class Connection:
    """One nats-py client, opened once and drained (or closed) once."""

    def __init__(self, settings: AgentSettings, worker_id: str, logger: Any) -> None:
        self.s, self.worker_id, self.log = settings, worker_id, logger
        self.nc = Client()
        self.closing = False  # set when leaving: a disconnect then is not news
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self.nc.is_connected

    async def open(self) -> Client:
        """Connect; an unreachable server is retried (and logged) until cancelled."""
        try:
            await self.nc.connect(**self._options())
        except BaseException:
            self.closing = True
            await self.nc.close()
            raise
        self._connected = True
        self.log.info("nats_connected", server=self.server())
        return self.nc

    async def close(self) -> None:
        """Drain, bounded; close instead when reconnecting, closed or stuck."""
        self.closing = True
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S + 1.0):
                await self.nc.drain()
        except (nats.errors.Error, TimeoutError):
            await self.nc.close()

    def server(self) -> str:
        url = self.nc.connected_url
        return f"{url.hostname}:{url.port}" if url is not None else "?"

    def _options(self) -> dict[str, Any]:
        reconnect = Reconnect(wait_s=self.s.reconnect_wait_s, jitter_s=self.s.reconnect_jitter_s)
        options = NatsOptions.of(
            self.s.servers, f"worker-agent {self.worker_id}", reconnect=reconnect,
            ping_interval_s=10, auth=self.s.auth,
        )  # fmt: skip
        return options.kwargs(
            drain_timeout=int(DRAIN_TIMEOUT_S), max_outstanding_pings=2,
            error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )  # fmt: skip

    async def _on_error(self, e: Exception) -> None:
        if not self._connected:
            self.log.warning(
                "nats_unreachable",
                servers=[redact(u) for u in self.s.servers],
                error=error_text(e),
                retry_in_s=self.s.reconnect_wait_s,
            )
        elif isinstance(e, OSError | asyncio.TimeoutError | nats.errors.StaleConnectionError):
            self.log.debug("nats_connect_failed", error=error_text(e))
        else:
            self.log.warning("nats_error", error=error_text(e))

    async def _on_disconnected(self) -> None:
        if not self.closing:
            self.log.warning("nats_disconnected")

    async def _on_reconnected(self) -> None:
        self.log.info("nats_reconnected", server=self.server())
