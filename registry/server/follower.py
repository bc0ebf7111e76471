"""A standby registry's view: the bucket as the active one writes it.

A standby does not fold events, but it answers the query service like the
active one (a micro service spreads requests over every instance): from the
bucket, followed by an ordered consumer that delivers the last value of every
key and then each newer one. Its answers trail the active registry's by the
time a bucket write takes to come by (milliseconds; seconds if the consumer
stalls and is recreated).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from registry.cancel import raise_if_cancelled
from registry.catalog import Catalog
from registry.lastvalues import is_deleted
from registry.protocol import WORKER_INFO_DECODER, WorkerInfo
from registry.server.provision import DEFAULT_NAMES, Names

log = structlog.get_logger("registry.follower")

RETRY_S = 1.0


class Follower:
    def __init__(self, nc: Client, names: Names = DEFAULT_NAMES) -> None:
        self.nc = nc
        self.names = names
        self.prefix = f"$KV.{names.bucket}."
        self.catalog = Catalog()
        self.values_seen = 0
        self.values_invalid = 0
        self.loaded = asyncio.Event()  # every key the bucket held when following began
        self.listeners: set[Callable[[str, WorkerInfo | None], None]] = set()  # told of changes
        self._loaded_through = 0

    def records(self) -> Mapping[str, WorkerInfo]:
        return self.catalog.records

    async def run(self) -> None:
        """Follow the bucket until cancelled (starting from an empty view). The ordered
        consumer recovers from gaps and reconnects by itself; one that cannot be made
        (no stream leader yet, say) is tried again every second."""
        while True:
            self.catalog.reset(())
            self.loaded.clear()
            try:
                info = await self.nc.jetstream().stream_info(self.names.kv_stream)
                self._loaded_through = info.state.last_seq
                if self._loaded_through == 0:
                    self.loaded.set()
                sub = await self.nc.jetstream().subscribe(
                    f"{self.prefix}>", stream=self.names.kv_stream, ordered_consumer=True,
                    cb=self._take, deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                    idle_heartbeat=1.0, pending_msgs_limit=-1, pending_bytes_limit=-1,
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a standby keeps trying
                raise_if_cancelled()
                log.warning("follower_retrying", error=f"{type(e).__name__}: {e}")
                await asyncio.sleep(RETRY_S)
                continue
            try:
                raise_if_cancelled()  # a stop that nats-py's subscribe swallowed
                await asyncio.Event().wait()
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
                self.catalog.reset(())  # an active registry answers from its projector:
                # a view kept from before would hold every record of then (purged ones too)

    async def _take(self, msg: Msg) -> None:
        key = msg.subject[len(self.prefix) :]
        self.values_seen += 1
        if not self.loaded.is_set() and msg.metadata.sequence.stream >= self._loaded_through:
            self.loaded.set()  # the newest value then is in: so is every older key's last one
        if is_deleted(msg):
            self.catalog.remove(key)
            self._tell(key, None)
            return
        try:
            record = WORKER_INFO_DECODER.decode(msg.data)
        except msgspec.DecodeError:  # the active registry repairs such values; skip it here
            self.values_invalid += 1
            return
        if record.worker_id != key:
            self.values_invalid += 1
            return
        self.catalog.put(record)
        self._tell(key, record)

    def _tell(self, key: str, record: WorkerInfo | None) -> None:
        for listener in tuple(self.listeners):
            listener(key, record)
