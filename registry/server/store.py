"""The one module that touches the `workers` bucket (typed load, CAS write, delete)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from registry.protocol import BUCKET, WORKER_INFO_DECODER, WorkerInfo
from registry.server.jsmeta import ack_meta
from registry.server.pipeline import PublishFailed
from registry.share import Parts

log = structlog.get_logger("registry.store")

WRONG_LAST_SEQUENCE = (10071, 10164)


class Entry(msgspec.Struct, gc=False):
    """A record and the bucket revision it was read at or written as (mutable).

    Not tracked by the cyclic GC (it can hold no cycle: a frozen record and
    an int), so 100,000 of them add nothing to a full collection."""

    record: WorkerInfo
    revision: int


class Bucket:
    """Typed access to bucket `workers` (a stream `KV_<bucket>` on `$KV.<bucket>.>`)."""

    def __init__(self, nc: Client, bucket: str = BUCKET) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self.prefix = f"$KV.{bucket}."

    async def load_all(
        self, idle_timeout_s: float = 10.0, share: Parts | None = None
    ) -> tuple[dict[str, Entry], dict[str, int]]:
        """Every current value with its revision, and the revisions of deleted keys
        (read as `read_last_values` says). With `share`, records point at one copy
        of the parts the fleet repeats."""
        entries: dict[str, Entry] = {}
        tombstones: dict[str, int] = {}

        def take(key: str, msg: Msg) -> None:
            entries.pop(key, None)  # a newer value of a key replaces what came before
            tombstones.pop(key, None)
            revision = ack_meta(msg).seq
            if is_deleted(msg):
                tombstones[key] = revision
                return
            try:
                record = WORKER_INFO_DECODER.decode(msg.data)
            except msgspec.DecodeError as e:
                tombstones[key] = revision  # overwritten by the next event of this worker
                log.warning("record_undecodable", worker_id=key, error=str(e))
                return
            entries[key] = Entry(share.record(record) if share else record, revision)

        await read_last_values(self.nc, self.stream, self.prefix, take, idle_timeout_s)
        return entries, tombstones

    async def get(self, key: str) -> Entry | None:
        kv = await self.js.key_value(self.bucket)
        try:
            e = await kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if e.value is None:
            return None
        return Entry(WORKER_INFO_DECODER.decode(e.value), e.revision or 0)

    async def delete(self, key: str, last_revision: int) -> int:
        """Delete (a KV delete marker) if unchanged; returns the marker's revision."""
        headers = {
            "KV-Operation": "DEL",
            api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last_revision),
        }
        ack = await self.js.publish(self.prefix + key, b"", headers=headers)
        return ack.seq


def is_deleted(msg: Msg) -> bool:
    """A KV delete or purge marker."""
    return (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE")


async def read_last_values(
    nc: Client, stream: str, prefix: str, take: Callable[[str, Msg], None],
    idle_timeout_s: float = 10.0,
) -> None:  # fmt: skip
    """`take(key, msg)` for the last message of every key of a KV stream, and for
    any newer message that comes before the read is complete (a key can come twice).

    A consumer delivers the last value of every key, then every newer one; we
    stop once each key the stream listed after that consumer was made has come
    by (its value then, or a newer one). Not when a message says nothing is
    pending: while someone writes the bucket, a key whose value is replaced
    before it is delivered comes later, after a message that said 0 pending
    (seen: 4 of 100 reads of 400 busy keys came back short). It gives up when
    nothing arrives for `idle_timeout_s` (not after a fixed total, which a
    large enough bucket would exceed)."""
    waiting = _Waiting()

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
    try:
        waiting.expect(await stream_keys(nc, stream, prefix))
        await waiting.done(idle_timeout_s, stream)
    finally:
        await sub.unsubscribe()


async def stream_keys(nc: Client, stream: str, prefix: str) -> set[str]:
    """Every key a KV stream holds now, deleted ones too: its subject list, page by
    page (the server sends at most 100,000 subjects per answer)."""
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


class _Waiting:
    """Which listed keys have not come by yet; done once none is left (or a take failed)."""

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
            self._done.set()

    def expect(self, keys: set[str]) -> None:
        assert self.seen is not None
        self.missing, self.seen = keys - self.seen, None
        if not self.missing:
            self._done.set()

    def fail(self, error: Exception) -> None:
        self.failed = error
        self._done.set()

    async def done(self, idle_timeout_s: float, stream: str) -> None:
        """Wait, bounded by progress rather than by the bucket's size."""
        seen = -1
        while not self._done.is_set():
            if self.taken == seen:
                raise TimeoutError(
                    f"reading {stream}: nothing for {idle_timeout_s} s with "
                    f"{len(self.missing)} keys still to come after {self.taken} values"
                )
            seen = self.taken
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle_timeout_s):
                    await self._done.wait()
        if self.failed is not None:
            raise self.failed


def is_conflict(err: BaseException) -> bool:
    """A CAS write refused because someone else wrote the key first."""
    if isinstance(err, KeyWrongLastSequenceError):
        return True
    return isinstance(err, APIError | PublishFailed) and err.err_code in WRONG_LAST_SEQUENCE
