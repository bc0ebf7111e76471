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
)

from registry.lastvalues import is_deleted, read_last_values
from registry.protocol import BUCKET, WORKER_INFO_DECODER, WorkerInfo, encode
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

    async def delete(self, key: str, last_revision: int) -> int:
        """Delete (a KV delete marker) if unchanged; returns the marker's revision."""
        headers = {
            "KV-Operation": "DEL",
            api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last_revision),
        }
        ack = await self.js.publish(self.prefix + key, b"", headers=headers)
        return ack.seq


def is_conflict(err: BaseException) -> bool:
    """A CAS write refused because someone else wrote the key first."""
    if isinstance(err, KeyWrongLastSequenceError):
        return True
    return isinstance(err, APIError | PublishFailed) and err.err_code in WRONG_LAST_SEQUENCE
