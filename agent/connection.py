"""The agent's one NATS connection: reconnect forever with jitter, say what happens.

Lives on the agent's thread. Its callbacks only log; the agent decides what a
disconnect means (heartbeats are skipped while it lasts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import nats.errors
from nats.aio.client import Client

from agent.publish import error_text
from agent.settings import AgentSettings
from registry.connect import NatsOptions, Reconnect, is_refused, redact

DRAIN_TIMEOUT_S: Final = 2.0


class Connection:
    """One nats-py client, opened once and drained (or closed) once."""

    def __init__(
        self, settings: AgentSettings, worker_id: str, logger: Any,
        on_closed: Callable[[str], None] = lambda why: None,
    ) -> None:  # fmt: skip
        self.s, self.worker_id, self.log = settings, worker_id, logger
        self.on_closed = on_closed  # the server ended the connection for good (not us)
        self.nc = Client()
        self.closing = False  # set when leaving: a disconnect then is not news
        self._connected = False
        self._refused = False  # the server said no to our credentials; said once

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
            reconnected_cb=self._on_reconnected, closed_cb=self._on_closed,
        )  # fmt: skip

    async def _on_error(self, e: Exception) -> None:
        if is_refused(e):  # revoked, expired, or credentials of another deployment
            if not self._refused:
                self.log.error(
                    "nats_not_authorized", error=error_text(e),
                    hint="the server refuses these credentials (revoked or expired?); "
                    "retrying: a new credentials file at the same path is read on the next try",
                )  # fmt: skip
            self._refused = True
            return
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

    async def _on_closed(self) -> None:
        """nats-py closes for good, without reconnecting, when the server ends the
        connection with an error (revoked or expired credentials, among others)."""
        if not self.closing and self._connected:
            last = self.nc.last_error
            self.on_closed(error_text(last) if last is not None else "no reason given")

    async def _on_reconnected(self) -> None:
        self._refused = False
        self.log.info("nats_reconnected", server=self.server())
