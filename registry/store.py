"""The one module that touches the `workers` bucket (typed load, CAS write, delete)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

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

from registry.pipeline import PublishFailed
from registry.protocol import BUCKET, WORKER_INFO_DECODER, WorkerInfo

log = structlog.get_logger("registry.store")

WRONG_LAST_SEQUENCE = (10071, 10164)


@dataclass(slots=True)
class Entry:
    record: WorkerInfo
    revision: int


class Bucket:
    """Typed access to bucket `workers` (a stream `KV_<bucket>` on `$KV.<bucket>.>`)."""

    def __init__(self, js: JetStreamContext, bucket: str = BUCKET) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self.prefix = f"$KV.{bucket}."

    async def load_all(self, timeout_s: float = 30.0) -> tuple[dict[str, Entry], dict[str, int]]:
        """Every current value with its revision, and the revisions of deleted keys."""
        entries: dict[str, Entry] = {}
        tombstones: dict[str, int] = {}
        info = await self.js.stream_info(self.stream)
        if not info.state.messages:
            return entries, tombstones
        sub = await self.js.subscribe(
            f"{self.prefix}>", stream=self.stream, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=-1, pending_bytes_limit=-1,
        )  # fmt: skip
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    msg = await sub.next_msg(timeout=timeout_s)
                    self._take(entries, tombstones, msg)
                    if msg.metadata.num_pending == 0:
                        return entries, tombstones
        finally:
            await sub.unsubscribe()

    def _take(self, entries: dict[str, Entry], tombstones: dict[str, int], msg: Msg) -> None:
        key = msg.subject[len(self.prefix) :]
        revision = msg.metadata.sequence.stream
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
            tombstones[key] = revision
            return
        try:
            entries[key] = Entry(WORKER_INFO_DECODER.decode(msg.data), revision)
        except msgspec.DecodeError as e:
            tombstones[key] = revision  # overwritten by the next event of this worker
            log.warning("record_undecodable", worker_id=key, error=str(e))

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
