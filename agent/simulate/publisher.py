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
    retried: int
    last_error: str

    @property
    def in_flight(self) -> int: ...

    async def publish(self, subject: str, body: bytes) -> None: ...

    async def settle(self, timeout_s: float) -> None: ...


class AckedPublisher:
    """Pipelined JetStream publishes: at most `window` not yet answered by a PubAck.

    Every publish carries a random Nats-Msg-Id and a reply subject of the current
    epoch ending in its own token; one subscription takes the answers. A publish
    answered "no stream responded" (503: a stream leader being elected, a stream
    not there yet) is sent again, with the same Nats-Msg-Id, after a short pause,
    for up to `retry_s` from its first send: the stream stores it once. When
    nothing is answered for `ack_timeout_s` (a server restart lost them), the
    outstanding ones are counted as timed out and a new epoch starts, so a late
    answer is not counted twice.
    """

    def __init__(
        self, nc: Client, window: int = 4096, ack_timeout_s: float = 5.0, retry_s: float = 15.0
    ) -> None:
        self.nc = nc
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.retry_s = retry_s
        self.sent = self.settled = self.acked = self.errors = self.timeouts = self.duplicates = 0
        self.retried = 0
        self.last_error = ""
        self._prefix = nc.new_inbox()
        self._epoch = 0
        self.reply = f"{self._prefix}.0"
        self._room = asyncio.Event()
        self._sub: Any = None
        self._next = 0
        # token -> (subject, body, msg id, first sent at): what a 503 sends again
        self._pending: dict[str, tuple[str, bytes, str, float]] = {}
        self._retries: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return self.sent - self.settled

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(
            f"{self._prefix}.>", cb=self._on_ack, pending_msgs_limit=-1, pending_bytes_limit=-1
        )

    async def publish(self, subject: str, body: bytes) -> None:
        if self.sent - self.settled >= self.window:
            await self._wait_until(self.window - 1)
        if await self._send(subject, body, new_msg_id(), time.monotonic()):
            self.sent += 1

    async def _send(self, subject: str, body: bytes, msg_id: str, first: float) -> bool:
        self._next += 1
        token = str(self._next)
        try:
            await self.nc.publish(
                subject, body, reply=f"{self.reply}.{token}", headers={"Nats-Msg-Id": msg_id}
            )
        except nats.errors.ConnectionClosedError:
            raise
        except nats.errors.Error as e:  # buffer full while reconnecting, ...
            self.errors += 1
            self.last_error = str(e) or type(e).__name__
            return False
        self._pending[token] = (subject, body, msg_id, first)
        return True

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
            self._pending.clear()
            for task in self._retries:
                task.cancel()

    async def _on_ack(self, msg: Msg) -> None:
        epoch, _, token = msg.subject.rpartition(".")
        if epoch != self.reply:
            return  # an answer from a timed-out epoch
        sent = self._pending.pop(token, None)
        if sent is None:
            return
        data = msg.data
        if _no_stream(msg) and time.monotonic() - sent[3] < self.retry_s:
            task = asyncio.ensure_future(self._again(*sent))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
            return
        self.settled += 1
        if not data or b'"error"' in data:
            self.errors += 1
            self.last_error = data.decode(errors="replace")[:200] or "no responders"
        else:
            self.acked += 1
            if b'"duplicate"' in data:
                self.duplicates += 1
        self._room.set()

    async def _again(self, subject: str, body: bytes, msg_id: str, first: float) -> None:
        """The same event, the same Nats-Msg-Id, after a pause (an election takes seconds)."""
        await asyncio.sleep(RETRY_PAUSE_S)
        self.retried += 1
        if not await self._send(subject, body, msg_id, first):
            self.settled += 1  # counted as an error by _send
            self._room.set()


RETRY_PAUSE_S = 0.25


def _no_stream(msg: Msg) -> bool:
    """503: no stream answered (no responders, or JetStream's own 503 while it has no
    leader); the event was not stored and may be sent again."""
    status = (msg.headers or {}).get("Status") if msg.headers else None
    return status == "503" or (not msg.data and status is None) or b'"code":503' in msg.data
