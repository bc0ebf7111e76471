"""The one module that touches the `workers` bucket (typed load, CAS write, delete)."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import (
    APIError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from registry.jsmeta import ack_meta
from registry.pipeline import PublishFailed
from registry.protocol import BUCKET, WORKER_INFO_DECODER, WorkerInfo
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

    def __init__(self, js: JetStreamContext, bucket: str = BUCKET) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self.prefix = f"$KV.{bucket}."

    async def load_all(
        self, idle_timeout_s: float = 10.0, share: Parts | None = None
    ) -> tuple[dict[str, Entry], dict[str, int]]:
        """Every current value with its revision, and the revisions of deleted keys.

        It gives up when nothing arrives for `idle_timeout_s` (not after a fixed
        total, which a large enough bucket would exceed). With `share`, records
        point at one copy of the parts the fleet repeats."""
        entries: dict[str, Entry] = {}
        tombstones: dict[str, int] = {}
        info = await self.js.stream_info(self.stream)
        if not info.state.messages:
            return entries, tombstones
        done = asyncio.Event()
        taken = 0
        failed: list[Exception] = []

        async def take(msg: Msg) -> None:
            # an exception here would go to nats-py's error callback, not to us
            nonlocal taken
            try:
                meta = ack_meta(msg)
                self._take(entries, tombstones, msg, meta.seq, share)
            except Exception as e:  # noqa: BLE001 - re-raised by load_all below
                failed.append(e)
                done.set()
                return
            taken += 1
            if meta.pending == 0:
                done.set()  # values stored after this one may still be taken: newer, harmless

        sub = await self.js.subscribe(
            f"{self.prefix}>", stream=self.stream, ordered_consumer=True, cb=take,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT, idle_heartbeat=1.0,
            pending_msgs_limit=-1, pending_bytes_limit=-1,
        )  # fmt: skip
        try:
            seen = -1
            while not done.is_set():  # bounded by progress, not by the bucket's size
                if taken == seen:
                    raise TimeoutError(
                        f"loading bucket {self.bucket}: nothing for {idle_timeout_s} s "
                        f"after {taken} of about {info.state.messages} entries"
                    )
                seen = taken
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle_timeout_s):
                        await done.wait()
            if failed:
                raise failed[0]
            return entries, tombstones
        finally:
            await sub.unsubscribe()

    def _take(
        self, entries: dict[str, Entry], tombstones: dict[str, int], msg: Msg, revision: int,
        share: Parts | None,
    ) -> None:
        key = msg.subject[len(self.prefix) :]
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            tombstones[key] = revision
            return
        try:
            record = WORKER_INFO_DECODER.decode(msg.data)
        except msgspec.DecodeError as e:
            tombstones[key] = revision  # overwritten by the next event of this worker
            log.warning("record_undecodable", worker_id=key, error=str(e))
            return
        entries[key] = Entry(share.record(record) if share else record, revision)

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


def is_conflict(err: BaseException) -> bool:
    """A CAS write refused because someone else wrote the key first."""
    if isinstance(err, KeyWrongLastSequenceError):
        return True
    return isinstance(err, APIError | PublishFailed) and err.err_code in WRONG_LAST_SEQUENCE
