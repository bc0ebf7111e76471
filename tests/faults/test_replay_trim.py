"""Replay once the stream has trimmed a worker's history.

WORKER_EVENTS keeps at most 100 messages per subject (max_msgs_per_subject),
so after 100 heartbeats a worker's oldest heartbeats are gone from the stream.
DESIGN.md invariant 1 says deleting the bucket and the consumer and replaying
rebuilds *exactly* the same state. Every field does come back, except
`version`, which counts the events folded into the record: the live record
counted every heartbeat, the replay only those still in the stream.

`version` is the documented exception (README "Guarantees", docs/wire.md): it
counts the events folded into the record, and a replay folds only the events the
stream still holds. This test pins exactly that: every other field is rebuilt,
and the replayed `version` is the number of the worker's events retained.
"""

from __future__ import annotations

import json

from nats.aio.client import Client

from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.faults.helpers import replay, without
from tests.integration.registry_helpers import (
    EVENTS,
    bounded,
    bucket_records,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
    running_registry,
)

PER_SUBJECT = 100  # nats/streams/WORKER_EVENTS.json
BEATS = 150
CHUNK = 50


@bounded(30)
async def test_replay_after_trimming_rebuilds_every_field_and_counts_the_retained_events(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, caught_up=True):
        await publish(js, "register", "w-long", register_body("w-long", inc, heartbeat_interval_s=3600))
        for first in range(1, BEATS + 1, CHUNK):  # folded before the stream trims them
            acks = [
                await js.publish_async(
                    "worker.heartbeat.w-long",
                    json.dumps(heartbeat_body("w-long", inc, completed_tasks=n)).encode(),
                )
                for n in range(first, first + CHUNK)
            ]
            last = (await acks[-1]).seq
            await eventually(lambda: folded(js, "w-long", last))
    snapshot = await bucket_records(js)
    info = await js.stream_info(EVENTS, subjects_filter="worker.heartbeat.w-long")
    rebuilt = await replay(nats_server.url, js, snapshot)

    assert (info.state.subjects or {})["worker.heartbeat.w-long"] == PER_SUBJECT  # trimmed
    assert snapshot["w-long"]["version"] == 1 + BEATS
    assert without(rebuilt, "version") == without(snapshot, "version")  # all else agrees
    assert rebuilt["w-long"]["version"] == 1 + PER_SUBJECT  # the register + retained heartbeats
