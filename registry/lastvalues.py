"""Reading the last message of every subject of a stream, completely, while others write.

A KV bucket (one key per subject, history 1) and WORKER_AVAILABILITY (one
message kept per worker) are both read this way: a consumer that delivers the
last message per subject, then every newer one. When is the read complete? Not
at the first message that says nothing is pending: while someone writes, a
subject whose message is replaced before its delivery comes later, after a
message that said 0 pending (seen: 9 of 30 reads of a 400-key bucket beside a
writer came back short). Instead the stream's subject list is taken just after
the consumer is made, and the read is complete once each listed subject has
come by (its message then, or a newer one).

Messages also go away: a purged worker's markers carry a TTL (per-message,
`Nats-TTL`), and one that expires between the listing and its delivery is
never delivered. So a read that waits looks at the subject list again every
RELIST_S, and strikes off the keys no longer listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import APIError

RELIST_S = 1.0  # a read still waiting lists the subjects again this often


def is_deleted(msg: Msg) -> bool:
    """A KV delete or purge marker."""
    return (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")


async def read_last_values(
    nc: Client, stream: str, prefix: str, take: Callable[[str, Msg], None],
    idle_timeout_s: float = 10.0,
) -> None:  # fmt: skip
    """`take(key, msg)` for the last message of every subject under `prefix` (the key
    is the rest of the subject), and for any newer message that comes before the
    read is complete: a key can come twice, the later message being the newer. It
    gives up when no listed key arrives for `idle_timeout_s` (not after a fixed
    total, which a large enough stream would exceed)."""
    waiting = Arrivals()

    async def cb(msg: Msg) -> None:
        # an exception here would go to nats-py's error callback, not to us
        key = msg.subject[len(prefix) :]
        try:
            take(key, msg)
        except Exception as e:  # noqa: BLE001 - re-raised below
            waiting.fail(e)
            return
        waiting.came(key)

    sub = await nc.jetstream().subscribe(
        f"{prefix}>", stream=stream, ordered_consumer=True, cb=cb,
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT, idle_heartbeat=1.0,
        pending_msgs_limit=-1, pending_bytes_limit=-1,
    )  # fmt: skip
    def relist() -> Awaitable[set[str]]:
        return stream_keys(nc, stream, prefix)

    try:
        waiting.expect(await relist())
        await waiting.done(idle_timeout_s, stream, relist)
    finally:
        await sub.unsubscribe()


async def stream_keys(nc: Client, stream: str, prefix: str) -> set[str]:
    """Every key a stream holds now under `prefix` (a KV bucket's deleted keys too):
    its subject list without the prefix, page by page (the server sends at most
    100,000 subjects per answer)."""
    keys: set[str] = set()
    offset = 0
    while True:
        body = json.dumps({"subjects_filter": f"{prefix}>", "offset": offset}).encode()
        msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", body, timeout=10.0)
        info = json.loads(msg.data)
        if "error" in info:
            raise APIError.from_error(info["error"])
        page = info["state"].get("subjects") or {}
        keys.update(subject[len(prefix) :] for subject in page)
        offset += len(page)
        if not page or offset >= info.get("total", 0):
            return keys


class Arrivals:
    """Which listed keys have not come by yet; done once none is left (or a take failed).

    Keys that come before the listing is known are remembered and struck off it."""

    def __init__(self) -> None:
        self.seen: set[str] | None = set()  # before the listing: every key that came
        self.missing: set[str] = set()
        self.taken = 0
        self.failed: Exception | None = None
        self._done = asyncio.Event()

    def came(self, key: str) -> None:
        self.taken += 1
        if self.seen is not None:
            self.seen.add(key)
            return
        self.missing.discard(key)
        if not self.missing:
            self.missing = set()  # an emptied set keeps its table: let it go
            self._done.set()

    def expect(self, keys: set[str]) -> None:
        assert self.seen is not None
        self.missing, self.seen = keys - self.seen, None
        if not self.missing:
            self._done.set()

    def prune(self, listed: set[str]) -> None:
        """The stream lists these keys now: a missing key that is not among them lost
        its message (expired, or removed) before it came, and never will."""
        if self.seen is None and self.missing and not self.missing <= listed:
            self.missing &= listed
            if not self.missing:
                self._done.set()

    def fail(self, error: Exception) -> None:
        self.failed = error
        self._done.set()

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> None:
        await self._done.wait()

    async def done(
        self, idle_timeout_s: float, stream: str,
        relist: Callable[[], Awaitable[set[str]]] | None = None,
    ) -> None:  # fmt: skip
        """Wait, bounded by progress rather than by the stream's size: give up when no
        listed key has come for `idle_timeout_s` (others coming meanwhile do not count).
        With `relist`, keys no longer listed are struck off every RELIST_S."""
        left, since = len(self.missing), time.monotonic()
        while not self._done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(RELIST_S, idle_timeout_s)):
                    await self._done.wait()
            if self._done.is_set():
                break
            if relist is not None:
                self.prune(await relist())
            if len(self.missing) != left:
                left, since = len(self.missing), time.monotonic()
            elif time.monotonic() - since >= idle_timeout_s:
                raise TimeoutError(
                    f"reading {stream}: no listed key for {idle_timeout_s} s, "
                    f"{left} still to come after {self.taken} values"
                )
        if self.failed is not None:
            raise self.failed
