"""Continuous pull from a durable consumer: messages arrive while the last batch is folded.

nats-py's `fetch(n)` waits until it has n messages or its timeout passes, so a
large batch on a trickle of events costs up to the whole timeout in latency,
and nothing is requested while a batch is being processed. Here pull requests
(with an expiry) are kept topped up on one inbox, and `take()` returns whatever
has arrived, at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from registry.server.link import Link

EXPIRES_S = 5.0


class ConsumerGone(Exception):
    """The server ended the pull (consumer deleted, or similar): resync."""


class Puller:
    def __init__(self, link: Link, epoch: int, stream: str, durable: str, batch: int) -> None:
        """`epoch`: the one the consumer was positioned in; a later one means resync."""
        self.link = link
        self.nc = nc = link.nc
        self.batch = batch
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._queue: deque[Msg] = deque()
        self._outstanding = 0
        self._requested_at = 0.0
        self._wake = asyncio.Event()
        self._gone: str | None = None
        self._epoch = epoch

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            self._inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def take(self, most: int, timeout_s: float) -> list[Msg]:
        """Whatever has arrived (up to `most`), waiting at most `timeout_s` for the first."""
        await self._top_up()
        if not self._queue:
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
        if self._gone is not None:
            raise ConsumerGone(self._gone)
        if self.link.reconnected_since(self._epoch):
            # our pull requests died with the old connection, and while we were away
            # heartbeats could not be stored: resync, so the sweeper waits for the
            # backlog and grants grace, as after a restart
            raise ConsumerGone("reconnected to the server")
        return [self._queue.popleft() for _ in range(min(most, len(self._queue)))]

    async def _top_up(self) -> None:
        now = time.monotonic()
        if self._outstanding and now - self._requested_at > EXPIRES_S + 2.0:
            self._outstanding = 0  # requests lost (a reconnect): ask again
        want = self.batch - self._outstanding - len(self._queue)
        if want < self.batch // 2:
            return
        body = {"batch": want, "expires": int(EXPIRES_S * 1e9)}
        await self.nc.publish(self._next, json.dumps(body).encode(), reply=self._inbox)
        self._outstanding += want
        self._requested_at = now

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            self._queue.append(msg)
            self._outstanding = max(0, self._outstanding - 1)
        elif status in ("408", "404"):  # a request expired: what it did not deliver
            left = int(msg.headers.get("Nats-Pending-Messages", 0)) if msg.headers else 0
            self._outstanding = max(0, self._outstanding - left)
        elif status == "409":
            # The protocol says why only in the description (as every NATS client reads it):
            # a deleted consumer ends this pull; anything else (leadership change) asks again.
            description = msg.headers.get("Description", "") if msg.headers else ""
            if "Deleted" in description:
                self._gone = description
            self._outstanding = 0
        elif status != "100":  # 100: idle heartbeat
            self._gone = f"status {status}"
        self._wake.set()
