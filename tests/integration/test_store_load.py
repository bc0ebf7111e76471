"""Bucket.load_all: every current value with its revision, deleted keys as
tombstones, shared parts, and a failure reported at once (not as a timeout)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from nats.aio.client import Client

from registry.protocol import encode
from registry.server.provision import provision
from registry.server.store import Bucket
from registry.share import Parts
from tests.factories import make_info
from tests.integration.registry_helpers import bounded

WORKERS = 3000  # beyond one pending-messages batch of the ordered consumer


async def _fill(nc: Client) -> dict[str, int]:
    await provision(nc)
    kv = await nc.jetstream().key_value("workers")
    revisions = {}
    for i in range(WORKERS):
        wid = f"w{i:04d}"
        rec = make_info(wid, capability="gpu" if i % 2 else "cpu", content_types=["text"])
        revisions[wid] = await kv.put(wid, encode(rec))
    revisions["w0001"] = await kv.put("w0001", encode(make_info("w0001", active=1)))  # newer value
    await kv.delete("w0002")
    await kv.put("bad", b"{not json")
    return revisions


@bounded(60)
async def test_load_all_returns_every_current_value_and_tombstone(nc: Client) -> None:
    revisions = await _fill(nc)
    parts = Parts()
    entries, tombstones = await Bucket(nc).load_all(share=parts)
    assert len(entries) == WORKERS - 1  # w0002 deleted
    assert set(tombstones) == {"w0002", "bad"}  # an undecodable value counts as gone
    assert entries["w0001"].record.metrics.active_tasks == 1
    assert all(entries[w].revision == r for w, r in revisions.items() if w != "w0002")
    gpu = [e.record.registration for w, e in entries.items() if e.record.registration.capability == "gpu"]
    assert all(r.hardware is gpu[0].hardware for r in gpu)  # one copy of equal parts


class _Broken(Parts):
    def record(self, record):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


@bounded(30)
async def test_a_failure_while_loading_is_raised_at_once(nc: Client) -> None:
    await _fill(nc)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="boom"):
        await Bucket(nc).load_all(idle_timeout_s=10.0, share=_Broken())
    assert time.monotonic() - t0 < 5.0  # not the idle timeout


@bounded(60)
async def test_load_all_misses_no_key_while_the_bucket_is_being_written(nc: Client) -> None:
    """A reader beside a writer (an operator's `registry workers` beside the projector):
    each read holds every key. Stopping at the first message that says nothing is
    pending missed keys replaced mid-read (9 of 30 such reads came back short)."""
    await provision(nc)
    js = nc.jetstream()
    keys = [f"w{i:03d}" for i in range(400)]
    values = {k: encode(make_info(k)) for k in keys}
    for k in keys:
        await js.publish(f"$KV.workers.{k}", values[k])
    stop = asyncio.Event()

    async def rewrite() -> None:
        rng = random.Random(9)
        while not stop.is_set():
            picked = rng.sample(keys, 50)
            await asyncio.gather(*(js.publish(f"$KV.workers.{k}", values[k]) for k in picked))

    writer = asyncio.create_task(rewrite())
    try:
        sizes = [len((await Bucket(nc).load_all())[0]) for _ in range(30)]
    finally:
        stop.set()
        await writer
    assert sizes == [len(keys)] * 30
