"""Where the fleet's events go: pipelined JetStream publishes.

A JetStream publish is a core publish with a reply subject, answered by a
PubAck; `AckedPublisher` counts the answers on one subscription and keeps at
most `window` unanswered. That is what `js.publish_async` does, at a third of
its cost per event (it builds a future, an inbox and a PubAck object per
message).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from registry.protocol import new_msg_id


class Publisher(Protocol):
    """Where the fleet's events go (an AckedPublisher; tests pass a recorder)."""

    acked: int
    errors: int
    timeouts: int
    duplicates: int
    last_error: str

    @property
    def in_flight(self) -> int: ...

    async def publish(self, subject: str, body: bytes) -> None: ...

    async def settle(self, timeout_s: float) -> None: ...


class AckedPublisher:
    """Pipelined JetStream publishes: at most `window` not yet answered by a PubAck.

    Every publish carries a random Nats-Msg-Id and the reply subject of the
    current epoch; one subscription counts the answers. When nothing is
    answered for `ack_timeout_s` (a server restart lost them), the outstanding
    ones are counted as timed out and a new epoch starts, so a late answer is
    not counted twice.
    """

    def __init__(self, nc: Client, window: int = 4096, ack_timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.sent = self.settled = self.acked = self.errors = self.timeouts = self.duplicates = 0
        self.last_error = ""
        self._prefix = nc.new_inbox()
        self._epoch = 0
        self.reply = f"{self._prefix}.0"
        self._room = asyncio.Event()
        self._sub: Any = None

    @property
    def in_flight(self) -> int:
        return self.sent - self.settled

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            f"{self._prefix}.*", cb=self._on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def publish(self, subject: str, body: bytes) -> None:
        if self.sent - self.settled >= self.window:
            await self._wait_until(self.window - 1)
        try:
            await self.nc.publish(
                subject, body, reply=self.reply, headers={"Nats-Msg-Id": new_msg_id()}
            )
        except nats.errors.ConnectionClosedError:
            raise
        except nats.errors.Error as e:  # buffer full while reconnecting, ...
            self.errors += 1
            self.last_error = str(e) or type(e).__name__
            return
        self.sent += 1

    async def settle(self, timeout_s: float) -> None:
        """Wait (bounded) until every publish is answered; the rest count as timed out."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        self._give_up()

    async def _wait_until(self, most: int) -> None:
        while self.sent - self.settled > most:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), self.ack_timeout_s)
            except TimeoutError:
                self._give_up()

    def _give_up(self) -> None:
        if self.in_flight:
            self.timeouts += self.in_flight
            self.settled = self.sent
            self._epoch += 1
            self.reply = f"{self._prefix}.{self._epoch}"

    async def _on_ack(self, msg: Msg) -> None:
        if msg.subject != self.reply:
            return  # an answer from a timed-out epoch
        self.settled += 1
        data = msg.data
        if not data or b'"error"' in data:
            self.errors += 1
            self.last_error = data.decode(errors="replace")[:200] or "no responders"
        else:
            self.acked += 1
            if b'"duplicate"' in data:
                self.duplicates += 1
        self._room.set()
