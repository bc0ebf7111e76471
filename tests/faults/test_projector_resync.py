"""A resync mid-batch must not count events twice.

The projector folds a batch, writes the bucket, and only then acknowledges; a
failed write (here: a compare-and-set refused because someone else wrote the
key) makes it reload the bucket and redeliver from its checkpoint. The
bucket's effect stays exactly-once (event_seq), and so must the counters the
registry reports: `events_rejected` is "bad events the stream accepted", each
once, and `events_applied` is events folded into a record, each once.
"""

from __future__ import annotations

import json

from nats.aio.client import Client

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    record,
    register_body,
    running_registry,
)


@bounded(30)
async def test_a_resync_mid_batch_counts_each_event_once(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        reg = await publish(js, "register", "w1", register_body("w1", inc))
        await eventually(lambda: folded(js, "w1", reg.seq))
        kv = await js.key_value("workers")
        entry = await kv.get("w1")
        await kv.put("w1", entry.value)  # a foreign write: the projector's next CAS fails
        bad = await js.publish_async("worker.heartbeat.w1", b"not json")  # one batch:
        good = await js.publish_async(  # a bad event and a good one
            "worker.heartbeat.w1", json.dumps(heartbeat_body("w1", inc, completed_tasks=3)).encode()
        )
        await bad
        last = (await good).seq
        rec = await eventually(lambda: folded(js, "w1", last), timeout=10.0)
        counters = registry.counters()
    assert counters["resyncs"] >= 1  # the fault happened
    assert rec["version"] == 2 and rec["metrics"]["completed_tasks"] == 3  # the bucket: once
    assert (counters["events_rejected"], counters["events_applied"]) == (1, 2)  # the counters: once
    assert await record(js, "w1") == rec
