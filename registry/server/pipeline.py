"""Pipelined JetStream publishes: many in flight, one wait for all their acks.

nats-py's `publish_async` costs a task, a future and a `wait_for` per message;
at thousands of writes a second that overhead dominated the projector's
profile. Here every publish carries a reply token on one inbox subscription,
the ack runs a callback (the revision for a bucket write), and `flush()` waits
once for the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from registry.server.link import Link

OnAck = Callable[[int], None]


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ACK = msgspec.json.Decoder(_PubAck)


class PublishFailed(Exception):
    """The server refused a publish (err_code as in the JetStream API), or nobody stored it."""

    def __init__(self, subject: str, err_code: int, description: str) -> None:
        super().__init__(f"publish to {subject} refused: {description} (err_code {err_code})")
        self.subject = subject
        self.err_code = err_code


class Pipeline:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.nc = link.nc
        self._prefix = ""
        self._sub: Subscription | None = None
        self._next = 0
        self._pending: dict[str, tuple[str, OnAck | None, OnAck | None]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._failure: Exception | None = None
        self._epoch = link.epoch  # of the oldest publish in flight

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._prefix}.*", cb=self._on_reply)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str], on_ack: OnAck | None = None,
        on_duplicate: OnAck | None = None,
    ) -> None:  # fmt: skip
        """`on_ack(seq)` once stored; `on_duplicate(seq)` instead when the stream already
        held a message of this Nats-Msg-Id (seq is that message's)."""
        self.link.fence()  # a registry that lost its lease writes nothing more
        if not self._pending:
            self._epoch = self.link.epoch
        self._next += 1
        token = str(self._next)
        self._pending[token] = (subject, on_ack, on_duplicate)
        self._idle.clear()
        await self.nc.publish(subject, data, reply=f"{self._prefix}.{token}", headers=headers)

    async def flush(self, timeout_s: float) -> None:
        """Wait for every ack; raise the first refusal, or TimeoutError.

        Acks of publishes sent before a reconnect never come: that is noticed
        within a tenth of a second rather than at the timeout.
        """
        epoch = self._epoch
        try:
            async with asyncio.timeout(timeout_s):
                while not self._idle.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.1):
                            await self._idle.wait()
                    if self.link.lost_since(epoch):
                        raise ConnectionError("connection lost with publishes in flight")
        except (TimeoutError, ConnectionError):
            self._pending.clear()
            self._idle.set()
            raise
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def _on_reply(self, msg: Msg) -> None:
        item = self._pending.pop(msg.subject.rpartition(".")[2], None)
        if item is None:
            return
        subject, on_ack, on_duplicate = item
        try:
            ack = _ACK.decode(msg.data)
        except msgspec.DecodeError:
            ack = _PubAck(error=_ApiError(description="no stream answered (no responders)"))
        if ack.error is not None:
            self._failure = self._failure or PublishFailed(
                subject, ack.error.err_code, ack.error.description
            )
        elif ack.duplicate and on_duplicate is not None:
            on_duplicate(ack.seq)
        elif on_ack is not None:
            on_ack(ack.seq)
        if not self._pending:
            self._idle.set()
