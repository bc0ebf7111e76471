"""Provisioning from the definitions under nats/: harmless to repeat; a stream that
differs from its definition is refused with the field named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from registry import definitions
from registry.server.embedded import NatsServer
from registry.server.provision import DEFAULT_NAMES, Names, ProvisionError, consumer_ack_floor, provision
from tests.integration.registry_helpers import (
    AVAILABILITY,
    BUCKET,
    EVENTS,
    bounded,
    heartbeat_body,
    new_incarnation,
    publish,
    registry_process,
)


async def _stream_configs(nc: Client) -> dict[str, dict[str, Any]]:
    out = {}
    for name in (EVENTS, AVAILABILITY, f"KV_{BUCKET}"):
        msg = await nc.request(f"$JS.API.STREAM.INFO.{name}", b"", timeout=5.0)
        out[name] = json.loads(msg.data)["config"]
    return out


async def _create_events_stream_with(nc: Client, **changes: Any) -> None:
    """WORKER_EVENTS as someone else made it: the definition with `changes`."""
    cfg = {**definitions.load(f"streams/{EVENTS}.json"), **changes}
    msg = await nc.request(f"$JS.API.STREAM.CREATE.{EVENTS}", json.dumps(cfg).encode(), timeout=5.0)
    assert "error" not in json.loads(msg.data)


@bounded(20)
async def test_provisioning_twice_is_harmless(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    assert await provision(nc) is True  # the bucket was created now
    before = await _stream_configs(nc)
    await publish(js, "heartbeat", "w-1", heartbeat_body("w-1", new_incarnation()))
    assert await provision(nc) is False
    assert await _stream_configs(nc) == before
    assert (await js.stream_info(EVENTS)).state.messages == 1  # nothing lost
    assert (await js.stream_info(f"KV_{BUCKET}")).config.name == f"KV_{BUCKET}"


@bounded(20)
async def test_stream_with_different_limit_is_refused_naming_the_field(
    nats_server: NatsServer, nc: Client
) -> None:
    await _create_events_stream_with(nc, max_msgs_per_subject=5)
    with pytest.raises(ProvisionError, match="max_msgs_per_subject") as err:
        await provision(nc)
    assert EVENTS in str(err.value)
    assert "\n" not in str(err.value)


@bounded(30)
async def test_registry_up_refuses_mismatched_stream_with_one_line(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    await _create_events_stream_with(nc, max_msgs_per_subject=5)
    log = tmp_path / "stderr.log"
    async with registry_process(["--nats", nats_server.url], log) as proc:
        code = await proc.wait(20.0)
        stdout = await proc.proc.stdout.read()  # type: ignore[union-attr]
    lines = log.read_text().splitlines()
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("registry: ") and "max_msgs_per_subject" in lines[0]
    assert "Traceback" not in lines[0]
    assert stdout == b""  # never announced itself as running


async def test_only_a_missing_consumer_reads_as_no_checkpoint(nats_server: NatsServer, nc: Client) -> None:
    """None (fold from sequence 1) only when the consumer does not exist; any other
    error (here: no such stream; on a cluster: no leader yet) is raised and asked
    again, never read as 'start over'."""
    await provision(nc)
    assert await consumer_ack_floor(nc, DEFAULT_NAMES) is None
    with pytest.raises(ProvisionError):
        await consumer_ack_floor(nc, Names(events="NO_SUCH_STREAM"))


@bounded(20)
async def test_an_older_deployments_streams_are_upgraded_in_place(
    nats_server: NatsServer, nc: Client
) -> None:
    """Streams provisioned before per-message TTLs (purge markers that expire) get them
    turned on in place; their messages stay."""
    js = nc.jetstream()
    for name, file in ((AVAILABILITY, "streams/WORKER_AVAILABILITY.json"),
                       (f"KV_{BUCKET}", "kv/workers.json")):  # fmt: skip
        old = {k: v for k, v in definitions.load(file).items() if k != "allow_msg_ttl"}
        msg = await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(old).encode(), timeout=5.0)
        assert "error" not in json.loads(msg.data)
    await js.publish("worker.available.w-1", b"{}")
    await js.publish(f"$KV.{BUCKET}.w-1", b"{}")
    await provision(nc)
    configs = await _stream_configs(nc)
    assert configs[AVAILABILITY]["allow_msg_ttl"] is True
    assert configs[f"KV_{BUCKET}"]["allow_msg_ttl"] is True
    assert (await js.stream_info(AVAILABILITY)).state.messages == 1
    assert (await js.stream_info(f"KV_{BUCKET}")).state.messages == 1
    assert await provision(nc) is False  # and now it matches
