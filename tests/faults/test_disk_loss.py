"""A single-node deployment loses its disk: the nats-server comes back with an
empty store (no stream, no bucket, no consumer).

What is lost: every event (the history, `registry events`, `explain`) and every
record. What comes back: the fleet itself. Agents keep beating; once a registry
has provisioned the streams again, each heartbeat that has no registration
behind it is answered on worker.control.<id> with "register again", the agent
registers again (same incarnation) and is live and available within seconds.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from nats.aio.client import Client

from agent import Agent
from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import bounded, bucket_records, running_registry

AGENTS = 3
INTERVAL_S = 0.5
FAST: dict[str, Any] = {"reconnect_wait_s": 0.1, "reconnect_jitter_s": 0.1, "publish_timeout_s": 1.0}


def _lose_the_disk(server: NatsServer) -> None:
    server.kill()
    shutil.rmtree(server.data_dir / "jetstream")
    server.start()


@pytest.fixture
def agents(nats_server: NatsServer) -> Iterator[list[Agent]]:
    yield [
        Agent(nats_server.url, name=f"a{i}", worker_id=f"a{i}", heartbeat_interval_s=INTERVAL_S, **FAST)
        for i in range(AGENTS)
    ]


async def _fleet_live(js: object, agents: list[Agent]) -> bool:
    try:
        records = await bucket_records(js)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - no bucket yet
        return False
    return all(records.get(a.worker_id, {}).get("available") for a in agents)


@bounded(40)
async def test_after_the_store_is_lost_a_restarted_registry_gets_the_fleet_back(
    nats_server: NatsServer, nc: Client, agents: list[Agent]
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True, timeout_floor_s=1.0):
        for agent in agents:
            await agent.start()
        await eventually(lambda: _fleet_live(js, agents), timeout=10.0)
    try:
        await asyncio.to_thread(_lose_the_disk, nats_server)
        async with running_registry(nats_server.url, caught_up=True, timeout_floor_s=1.0):
            await eventually(lambda: _fleet_live(js, agents), timeout=15.0)
            records = await bucket_records(js)
            history = (await js.stream_info("WORKER_EVENTS")).state
    finally:
        for agent in agents:
            await agent.stop()
    assert {w: (r["incarnation"], r["offline_reason"]) for w, r in records.items()} == {
        a.worker_id: (a.incarnation, None) for a in agents
    }
    assert history.first_seq > 0 and history.messages < 50  # the old history is gone


@bounded(40)
async def test_after_the_store_is_lost_a_running_registry_recovers_by_itself(
    nats_server: NatsServer, nc: Client, agents: list[Agent]
) -> None:
    """Fails today: the running registry never provisions again; its projector
    retries 'stream not found' forever, and agents' events have no stream to
    land in, until someone restarts the registry."""
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True, timeout_floor_s=1.0):
        try:
            for agent in agents:
                await agent.start()
            await eventually(lambda: _fleet_live(js, agents), timeout=10.0)
            await asyncio.to_thread(_lose_the_disk, nats_server)
            await eventually(lambda: _fleet_live(js, agents), timeout=10.0)
        finally:
            for agent in agents:
                await agent.stop()
