"""Stop the registry for longer than every worker's timeout while a simulated
fleet (agent/simulate/) keeps beating: once it is back, it folds what it
missed before it judges anyone, so nobody is expired; a worker that really
went silent meanwhile still is (the sweeper is judging, not asleep).

(tests/integration/test_registry_downtime.py shows the same for four raw
workers; this is the fleet-sized version, with `registry up` as a process.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from nats.aio.client import Client

from agent.simulate import SimSettings, simulate
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.faults.helpers import stream_messages
from tests.integration.registry_helpers import (
    bounded,
    bucket_records,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
    registry_process,
)

FLEET = 400
INTERVAL_S = 0.5
FLOOR_S = 1.0
TIMEOUT_S = max(FLOOR_S, 3 * INTERVAL_S)  # 1.5 s
DOWN_S = 3 * TIMEOUT_S
JUDGED_S = 3 * TIMEOUT_S
SILENT = "gone-quiet"


def _sim(url: str) -> SimSettings:
    return SimSettings(nats_url=url, count=FLEET, heartbeat_interval_s=INTERVAL_S, seed=6,
                       id_prefix="sim", unregister=False, stop_timeout_s=4.0)  # fmt: skip


async def _all_live(js: object, n: int) -> bool:
    records = await bucket_records(js)  # type: ignore[arg-type]
    sims = [r for w, r in records.items() if w.startswith("sim-")]
    return len(sims) == n and all(r["offline_reason"] is None for r in sims)


@bounded(60)
async def test_registry_down_longer_than_the_timeout_expires_none_of_a_beating_fleet(
    nats_server: NatsServer, nc: Client, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await provision(nc)
    args = ["--nats", nats_server.url, "--timeout-floor", str(FLOOR_S), "--log-level", "info"]
    stop = asyncio.Event()
    fleet = asyncio.create_task(simulate(_sim(nats_server.url), stop))
    silent = new_incarnation()
    try:
        async with registry_process(args, tmp_path / "first.log") as first:
            await first.first_line()
            await publish(js, "register", SILENT,
                          register_body(SILENT, silent, heartbeat_interval_s=INTERVAL_S))  # fmt: skip
            await eventually(lambda: _all_live(js, FLEET), timeout=15.0, interval=0.2)
            await publish(js, "heartbeat", SILENT, heartbeat_body(SILENT, silent))  # its last
            assert await first.terminate() == 0
        await asyncio.sleep(DOWN_S)  # the fleet beats on; SILENT does not
        async with registry_process(args, tmp_path / "second.log") as second:
            await second.first_line()
            await asyncio.sleep(JUDGED_S)
            records = await bucket_records(js)
            assert await second.terminate() == 0
        judging = [e for e in second.log_events() if e.get("event") == "sweeper_started"]
    finally:
        stop.set()
        report = await asyncio.wait_for(fleet, 15.0)
    expiries = [m for m in await stream_messages(js, "worker.expired.*")]

    assert judging, "the second registry never started judging"
    assert [m.worker_id for m in expiries] == [SILENT]
    assert records[SILENT]["offline_reason"] == "expired"
    sims = {w: r for w, r in records.items() if w.startswith("sim-")}
    assert len(sims) == FLEET and all(r["offline_reason"] is None for r in sims.values())
    assert report.errors == 0 and report.heartbeat >= FLEET * (DOWN_S + JUDGED_S) / INTERVAL_S * 0.8
    assert json.loads(expiries[0].data)["timeout_s"] == TIMEOUT_S
