"""The one module that touches the `workers` bucket (typed load, CAS write, delete)."""

from __future__ import annotations

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
    NotFoundError,
)

from registry.lastvalues import is_deleted, read_last_values
from registry.protocol import BUCKET, WORKER_INFO_DECODER, WorkerInfo, encode
from registry.server.jsmeta import ack_meta
from registry.server.pipeline import PublishFailed
from registry.share import Parts

log = structlog.get_logger("registry.store")

WRONG_LAST_SEQUENCE = (10071, 10164)
TTL_HEADER = "Nats-TTL"  # per-message TTL, whole seconds (the stream allows them)


def purge_headers(last_revision: int, ttl_s: int) -> dict[str, str]:
    """A KV purge of a key (marker replaces its history), if unchanged since
    `last_revision`; the server removes the marker itself after `ttl_s`."""
    return {
        "KV-Operation": "PURGE",
        "Nats-Rollup": "sub",
        TTL_HEADER: str(ttl_s),
        api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last_revision),
    }


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
        self, idle_timeout_s: float = 10.0, share: Parts | None = None,
        expiring: dict[str, float] | None = None,
    ) -> tuple[dict[str, Entry], dict[str, int]]:  # fmt: skip
        """Every current value with its revision, and the revisions of deleted keys
        (read as `read_last_values` says). With `share`, records point at one copy
        of the parts the fleet repeats. `expiring` is given, for each marker with a
        TTL, when the server removes it (stored time + TTL, seconds since the epoch)."""
        entries: dict[str, Entry] = {}
        tombstones: dict[str, int] = {}
        expiring = {} if expiring is None else expiring

        def take(key: str, msg: Msg) -> None:
            entries.pop(key, None)  # a newer value of a key replaces what came before
            tombstones.pop(key, None)
            expiring.pop(key, None)
            meta = ack_meta(msg)
            revision = meta.seq
            if is_deleted(msg):
                tombstones[key] = revision
                ttl = _ttl_s((msg.headers or {}).get(TTL_HEADER))
                if ttl is not None:
                    expiring[key] = meta.stored_ns / 1e9 + ttl
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

    async def current(self, key: str) -> tuple[int, WorkerInfo | None] | None:
        """The key's revision and its record, None for a value that is not a record
        (what someone else wrote); None when the key holds nothing."""
        kv = await self.js.key_value(self.bucket)
        try:
            e = await kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        try:
            record = WORKER_INFO_DECODER.decode(e.value or b"")
        except msgspec.DecodeError:
            record = None
        return e.revision or 0, record

    async def overwrite(self, key: str, record: WorkerInfo, last_revision: int) -> int:
        """A CAS write of `record` over revision `last_revision`; returns the new revision."""
        headers = {api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last_revision)}
        ack = await self.js.publish(self.prefix + key, encode(record), headers=headers)
        return ack.seq

    async def purge(self, key: str, last_revision: int, ttl_s: int) -> int:
        """Purge if unchanged (a marker the server removes after `ttl_s`); returns the
        marker's revision."""
        headers = purge_headers(last_revision, ttl_s)
        ack = await self.js.publish(self.prefix + key, b"", headers=headers)
        return ack.seq

    async def last_revision(self, key: str) -> int:
        """The revision of the key's last message, a marker included; 0 for none."""
        try:
            msg = await self.js.get_last_msg(self.stream, self.prefix + key)
        except NotFoundError:
            return 0
        return msg.seq or 0


def _ttl_s(value: str | None) -> float | None:
    """A `Nats-TTL` value in seconds (whole seconds, or a Go duration in s/m/h); None
    for none or "never"."""
    if not value or value == "never":
        return None
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        if value[-1] in units:
            return float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError:
        return None


def is_conflict(err: BaseException) -> bool:
    """A CAS write refused because someone else wrote the key first."""
    if isinstance(err, KeyWrongLastSequenceError):
        return True
    return isinstance(err, APIError | PublishFailed) and err.err_code in WRONG_LAST_SEQUENCE
