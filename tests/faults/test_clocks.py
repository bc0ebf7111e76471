"""Wrong clocks change no verdict: the registry judges by JetStream's stored
times and its own monotonic clock, never by a wall clock.

- Agents whose clocks are an hour behind or ahead (their `sent_at`) are live
  while they beat, and expired on time when they stop.
- The registry host's wall clock jumps an hour forward or back in the middle
  of the run: `time.time`/`time.time_ns` (process-wide) and `datetime.now`
  (in every module of registry/ that calls it) are moved while the registry
  runs in this process. A registry that read the wall clock would expire
  everyone at once (forward) or nobody for an hour (back).

The real `Agent` here runs in the same process, so its `sent_at` (from
registry.protocol.utcnow) jumps with the host's clock too.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import pytest
from nats.aio.client import Client

from agent import Agent
from registry import protocol
from registry.server.embedded import NatsServer
from tests.faults.helpers import jumpable_wall_clock, stream_messages
from tests.integration.registry_helpers import (
    Beater,
    bounded,
    bucket_records,
    new_incarnation,
    publish,
    register_body,
    rfc3339,
    running_registry,
)

HOUR = 3600.0
INTERVAL_S = 0.2
FLOOR_S = 0.3
TIMEOUT_S = max(FLOOR_S, 3 * INTERVAL_S)  # 0.6 s
BEATING_ROUNDS = round(4 * TIMEOUT_S / INTERVAL_S)  # four timeouts
FAST: dict[str, Any] = {"reconnect_wait_s": 0.1, "reconnect_jitter_s": 0.1, "publish_timeout_s": 1.0}


def test_the_jump_reaches_every_wall_clock_reader_in_registry() -> None:
    """The patch really moves what registry/ would read (else the test below proves nothing)."""
    with jumpable_wall_clock() as clock:
        clock.jump(HOUR)
        ahead = (protocol.utcnow() - datetime.now(UTC)).total_seconds()
        import time

        ahead_time = time.time() - datetime.now(UTC).timestamp()
    assert abs(ahead - HOUR) < 1.0 and abs(ahead_time - HOUR) < 1.0
    assert abs((protocol.utcnow() - datetime.now(UTC)).total_seconds()) < 1.0  # restored


@pytest.mark.parametrize("jump_s", [HOUR, -HOUR], ids=["forward", "back"])
@bounded(40)
async def test_skewed_agents_and_a_jumping_registry_clock_change_no_verdict(
    nats_server: NatsServer, nc: Client, jump_s: float
) -> None:
    js = nc.jetstream()
    skew = {"behind": -HOUR, "ahead": HOUR, "quiet": HOUR}  # quiet: its last beat is "in an hour"
    incs = {wid: new_incarnation() for wid in skew}
    with jumpable_wall_clock() as clock:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(
                running_registry(nats_server.url, caught_up=True, timeout_floor_s=FLOOR_S)
            )
            for wid, off in skew.items():
                body = register_body(wid, incs[wid], heartbeat_interval_s=INTERVAL_S,
                                     sent_at=rfc3339(offset_s=off))  # fmt: skip
                await publish(js, "register", wid, body)
            agent = Agent(nats_server.url, name="real", worker_id="real",
                          heartbeat_interval_s=INTERVAL_S, **FAST)  # fmt: skip
            await stack.enter_async_context(agent)
            beaters = [
                await stack.enter_async_context(Beater(js, {w: incs[w]}, INTERVAL_S, skew[w]))
                for w in ("behind", "ahead")
            ]
            async with Beater(js, {"quiet": incs["quiet"]}, INTERVAL_S, skew["quiet"]) as quiet:
                await quiet.until(BEATING_ROUNDS // 2)
                clock.jump(jump_s)  # the registry host's wall clock, mid-run
                await quiet.until(2)
            last_quiet = quiet.last["quiet"].seq
            await beaters[0].until(BEATING_ROUNDS)  # four timeouts on the jumped clock
            records = await bucket_records(js)
            expiries = await stream_messages(js, "worker.expired.*")
            quiet_beat = await js.get_msg("WORKER_EVENTS", last_quiet)

    assert [m.worker_id for m in expiries] == ["quiet"]
    assert quiet_beat.time is not None
    silent_for = (expiries[0].time - quiet_beat.time).total_seconds()
    assert TIMEOUT_S <= silent_for <= TIMEOUT_S + 1.0
    assert records["quiet"]["offline_reason"] == "expired"
    live = {w: records[w]["offline_reason"] is None for w in ("behind", "ahead", "real")}
    assert live == {"behind": True, "ahead": True, "real": True}
