"""Active/standby: which registry process projects and sweeps, by a lease in a KV bucket.

The lease is key `active` of bucket `registry_lease` (protocol.Lease). Every
message on it carries a TTL (`Nats-TTL`), so the server removes it when its
holder stops renewing: kill -9, a pause, a partition. The holder renews it
every third of the TTL by compare-and-set on the revision it wrote last; a
renewal refused for a wrong revision means someone else holds it now. A
standby reads the key every POLL_S (not a watch: the KV watcher can stall for
seconds) and creates it once it is gone.

Holding is also judged locally, by the monotonic clock: the lease is ours until
TTL - MARGIN_S after the last successful renewal was *sent* (the server starts
its TTL later, when it stores it). A process paused past that (SIGSTOP, a long
GC, a frozen VM) finds on waking that its lease has lapsed before it writes
anything: `fence()` raises LeaseLost on every write path (registry.server.link).
What it had already sent before the pause is harmless by construction (see
docs/guarantees.md, "Two active registries").

A lapsed holder whose key is still there with its last revision (a renewal
lost in a leader election, say) takes it back by compare-and-set, keeping its
epoch: nobody else can have held it in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import msgspec
import structlog
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import APIError, NotFoundError

from registry.cancel import raise_if_cancelled
from registry.protocol import LEASE_DECODER, LEASE_KEY, Lease, encode, utcnow
from registry.server.provision import DEFAULT_NAMES, Names

log = structlog.get_logger("registry.lease")

DEFAULT_TTL_S: Final = 3
POLL_S: Final = 0.25  # a standby looks this often; a holder that lost it too
MARGIN_S: Final = 0.25  # stop believing a lease this long before its TTL could run out
REQUEST_TIMEOUT_S: Final = 1.0
WRONG_LAST_SEQUENCE: Final = (10071, 10164)


class LeaseLost(Exception):
    """This process no longer holds the lease: it must not write."""


def instance_name() -> str:
    """This process among the registries: host, pid and a few random characters."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


@dataclass
class Seen:
    """The lease as last read: who holds it, since when, in which epoch."""

    holder: str
    epoch: int
    since: datetime
    revision: int
    host: str
    pid: int

    def as_dict(self) -> dict[str, object]:
        return {"holder": self.holder, "epoch": self.epoch, "since": self.since.isoformat(),
                "host": self.host, "pid": self.pid}  # fmt: skip


class LeaseKeeper:
    """Acquires, renews, reclaims and releases the lease for one process."""

    def __init__(
        self, nc: Client, holder: str, ttl_s: int = DEFAULT_TTL_S, names: Names = DEFAULT_NAMES
    ) -> None:
        if ttl_s < 1:
            raise ValueError("the lease TTL is whole seconds, at least 1")
        self.nc = nc
        self.js = nc.jetstream()
        self.holder = holder
        self.ttl_s = ttl_s
        self.stream = names.lease_stream
        self.subject = f"$KV.{names.lease_bucket}.{LEASE_KEY}"
        self.seen: Seen | None = None  # the lease as last read or written
        self.epoch = 0  # ours, while we hold it (or may reclaim it)
        self.since: datetime | None = None
        self.acquired = 0  # terms begun
        self._revision = 0  # our last write
        self._valid_until = 0.0  # monotonic
        self._changed = asyncio.Event()
        self.on_failure: Callable[[], None] = lambda: None  # a request got no answer

    # ------------------------------------------------------------ state

    @property
    def held(self) -> bool:
        return self._revision > 0 and time.monotonic() < self._valid_until

    def fence(self) -> None:
        """Raise LeaseLost unless the lease is ours now (called before every write)."""
        if not self.held:
            raise LeaseLost(f"lease of epoch {self.epoch} lapsed or taken")

    def describe(self) -> dict[str, object]:
        """For `registry.stats` and `registry check`: this process, its role, the holder."""
        active = self.seen.as_dict() if self.seen is not None else None
        return {"instance": self.holder, "role": "active" if self.held else "standby",
                "lease_ttl_s": self.ttl_s, "active": active}  # fmt: skip

    async def wait_held(self) -> None:
        while not self.held:
            await self._wait_change(POLL_S)

    async def wait_lost(self) -> None:
        while self.held:
            await self._wait_change(max(0.0, self._valid_until - time.monotonic()))

    async def _wait_change(self, timeout_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()

    # ------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Hold the lease when it is free, renew it while held; until cancelled."""
        was_held = False
        while True:
            raise_if_cancelled()
            try:
                if self._revision and (self.held or self._may_reclaim()):
                    await self._renew()
                else:
                    await self._try_acquire()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - no answer (election, reconnect): try again
                raise_if_cancelled()
                log.debug("lease_request_failed", error=f"{type(e).__name__}: {e}")
                self.on_failure()
            if was_held and not self.held:
                log.warning("lease_lapsed", epoch=self.epoch, holder=self.holder)
                self._changed.set()
            was_held = self.held
            await asyncio.sleep(self.ttl_s / 3 if self.held else POLL_S)

    def _may_reclaim(self) -> bool:
        """Lapsed here, but the key may still hold our last write: try compare-and-set."""
        return self.seen is not None and self.seen.revision == self._revision

    async def _try_acquire(self) -> None:
        last = await self._read()
        if self.seen is not None:
            if self.seen.holder == self.holder and self.seen.revision == self._revision:
                await self._renew()
            return  # someone holds it
        sent = time.monotonic()
        since = utcnow()
        value = Lease(holder=self.holder, epoch=0, since=since, ttl_s=self.ttl_s,
                      host=socket.gethostname(), pid=os.getpid())  # fmt: skip
        revision = await self._write(value, last)
        if revision is None:
            return  # another standby was quicker
        self.epoch, self.since, self._revision = revision, since, revision
        self._valid_until = sent + self.ttl_s - MARGIN_S
        self.acquired += 1
        self.seen = Seen(self.holder, revision, since, revision, value.host, value.pid)
        log.info("lease_acquired", epoch=revision, holder=self.holder, ttl_s=self.ttl_s)
        self._changed.set()
        await self._renew()  # the creating message carries epoch 0: write the number

    async def _renew(self) -> None:
        assert self.since is not None
        sent = time.monotonic()
        value = Lease(holder=self.holder, epoch=self.epoch, since=self.since, ttl_s=self.ttl_s,
                      host=socket.gethostname(), pid=os.getpid())  # fmt: skip
        was_held = self.held
        revision = await self._write(value, self._revision)
        if revision is None:
            log.warning("lease_taken", epoch=self.epoch, holder=self.holder)
            self._revision, self._valid_until = 0, 0.0
            self.seen = None
            self._changed.set()
            return
        self._revision = revision
        self._valid_until = sent + self.ttl_s - MARGIN_S
        self.seen = Seen(self.holder, self.epoch, self.since, revision, value.host, value.pid)
        if not was_held:
            log.info("lease_reclaimed", epoch=self.epoch, holder=self.holder)
            self._changed.set()

    async def release(self, timeout_s: float = 1.0) -> None:
        """Give the lease up at once (a clean stop), so a standby need not wait for the
        TTL: a delete marker, compare-and-set on our last revision."""
        if not self.held:
            return
        revision, self._revision, self._valid_until = self._revision, 0, 0.0
        headers = {"KV-Operation": "DEL", api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(revision)}
        with contextlib.suppress(Exception):
            await self.js.publish(self.subject, b"", headers=headers, timeout=timeout_s)
            log.info("lease_released", epoch=self.epoch, holder=self.holder)

    # ------------------------------------------------------------ the key

    async def _read(self) -> int:
        """Read the key into `seen` (None: free); the revision a create must name."""
        try:
            msg = await self.js.get_last_msg(self.stream, self.subject)
        except NotFoundError:
            self.seen = None
            return 0
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            self.seen = None
            return int(msg.seq or 0)
        try:
            lease = LEASE_DECODER.decode(msg.data or b"")
        except msgspec.DecodeError as e:  # not ours to judge: it lapses by its TTL or not at all
            log.warning("lease_value_invalid", error=str(e))
            self.seen = Seen("?", 0, utcnow(), int(msg.seq or 0), "", 0)
            return int(msg.seq or 0)
        seq = int(msg.seq or 0)
        self.seen = Seen(lease.holder, lease.epoch or seq, lease.since, seq, lease.host, lease.pid)
        return seq

    async def _write(self, value: Lease, last: int) -> int | None:
        """Compare-and-set with a TTL; the new revision, or None if `last` is not the
        key's revision any more."""
        headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last)}
        try:
            ack = await self.js.publish(
                self.subject, encode(value), headers=headers, msg_ttl=self.ttl_s,
                timeout=REQUEST_TIMEOUT_S,
            )  # fmt: skip
        except APIError as e:
            if e.err_code in WRONG_LAST_SEQUENCE:
                return None
            raise
        return int(ack.seq)
