"""Router against a real nats-server: initial picture, latency, restarts, several routers."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from registry import protocol, query
from registry.protocol import Availability
from registry.router import Router
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.factories import make_avail


async def _quiet(_: Exception) -> None:
    pass


async def connect(url: str) -> Client:
    return await nats.connect(
        url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=_quiet
    )


async def publish(js: JetStreamContext, *avails: Availability) -> None:
    for a in avails:
        await js.publish_async(protocol.available_subject(a.worker_id), protocol.encode(a))
    await js.publish_async_completed()


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    await provision(nc)
    return nc.jetstream()


@pytest.fixture
async def router(nats_server: NatsServer, js: JetStreamContext) -> AsyncIterator[Router]:
    r = await Router.connect(nats_server.url)
    yield r
    await r.close()


async def test_router_knows_every_worker_published_before_it_started(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish(js, *(make_avail(f"w{i:04}", event_seq=i + 1) for i in range(1000)))
    await publish(js, make_avail("w0007", active=1, event_seq=5000))  # superseded value
    async with await Router.connect(nats_server.url) as router:
        assert len(router) == 1000
        w7 = router.get("w0007")
        assert w7 is not None and w7.active_tasks == 1


async def test_router_takes_several_server_urls_and_skips_a_dead_one(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish(js, make_avail("w1", event_seq=1))
    async with await Router.connect(f"nats://127.0.0.1:1,{nats_server.url}") as router:
        assert router.get("w1") is not None


async def test_router_is_ready_only_with_every_worker_while_availability_changes(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    """ready() means every worker listed at start() is in the index, even while the
    registry keeps announcing changes (a worker whose message is replaced before it
    is delivered comes after a message that says nothing is pending)."""
    ids = [f"w{i:03d}" for i in range(400)]
    await publish(js, *(make_avail(w, event_seq=1) for w in ids))
    stop = asyncio.Event()

    async def announce() -> None:
        rng, seq = random.Random(4), 1
        while not stop.is_set():
            seq += 1
            await publish(js, *(make_avail(w, event_seq=seq) for w in rng.sample(ids, 50)))

    announcer = asyncio.create_task(announce())
    try:
        for _ in range(20):
            async with await Router.connect(nats_server.url) as router:
                assert len(router) == len(ids)
    finally:
        stop.set()
        await announcer


async def test_router_connect_without_the_stream_fails(nats_server: NatsServer) -> None:
    with pytest.raises(nats.js.errors.NotFoundError):
        await Router.connect(nats_server.url)


async def test_router_on_an_empty_stream_is_ready_at_once(router: Router) -> None:
    await asyncio.wait_for(router.ready(), 2.0)
    assert router.pick("gpu") is None


async def test_router_sees_a_change_within_50_ms(router: Router, js: JetStreamContext) -> None:
    await router.ready()
    arrived: dict[int, float] = {}

    async def collect() -> None:
        async for change in router.changes():
            arrived[change.event_seq] = time.perf_counter()

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0)  # the collector is listening before the first publish
    delays = []
    for seq in range(1, 21):
        t0 = time.perf_counter()
        body = protocol.encode(make_avail("w1", active=seq % 2, event_seq=seq))
        await js.publish(protocol.available_subject("w1"), body)
        await eventually(lambda seq=seq: seq in arrived, timeout=2.0, interval=0.001)
        delays.append(arrived[seq] - t0)
    collector.cancel()
    median = statistics.median(delays)
    print(f"publish->index: median {median * 1e3:.2f} ms, max {max(delays) * 1e3:.2f} ms")
    assert median < 0.050, f"median publish->index {median * 1e3:.1f} ms"


async def test_router_picks_the_least_loaded_worker_it_was_told_about(
    router: Router, js: JetStreamContext
) -> None:
    await publish(js, make_avail("a", active=1), make_avail("b"), make_avail("c", capability="cpu"))
    await eventually(lambda: len(router) == 3)
    picked = router.pick("gpu")
    assert picked is not None and picked.worker_id == "b"
    assert [a.worker_id for a in router.available("cpu")] == ["c"]


async def test_router_stops_offering_a_worker_once_it_is_unavailable(
    router: Router, js: JetStreamContext
) -> None:
    await publish(js, make_avail("a"))
    await eventually(lambda: router.available("gpu"))
    await publish(js, make_avail("a", offline_reason="expired", event_seq=2))
    await eventually(lambda: not router.available("gpu"))


async def test_router_skips_an_undecodable_message(router: Router, js: JetStreamContext) -> None:
    await js.publish("worker.available.bad", b"{not json")
    await js.publish("worker.available.liar", protocol.encode(make_avail("someone-else")))
    await publish(js, make_avail("good"))
    await eventually(lambda: router.get("good") is not None)
    assert set(router.snapshot()) == {"good"}


async def test_changes_end_when_the_router_closes(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    router = await Router.connect(nats_server.url)
    await router.ready()

    async def drain() -> list[Availability]:
        return [c async for c in router.changes()]

    task = asyncio.create_task(drain())
    await asyncio.sleep(0.05)
    await publish(js, make_avail("a"))
    await eventually(lambda: router.get("a") is not None)
    await router.close()
    assert [c.worker_id for c in await asyncio.wait_for(task, 2.0)] == ["a"]


async def test_router_after_a_server_restart_has_the_same_index_as_a_fresh_one(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish(js, *(make_avail(f"w{i}", event_seq=1) for i in range(200)))
    router = await Router.connect(nats_server.url, idle_heartbeat_s=0.5)
    await router.ready()

    async def keep_changing() -> None:
        for i in range(300):
            a = make_avail(f"w{i % 250}", active=1 + i % 2, max_tasks=4, event_seq=10 + i)
            while True:
                try:
                    await js.publish(
                        protocol.available_subject(a.worker_id), protocol.encode(a), timeout=0.5
                    )
                    break
                except Exception:  # the server is restarting; retry
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.005)

    writer = asyncio.create_task(keep_changing())
    await asyncio.sleep(0.3)
    await asyncio.to_thread(nats_server.restart)
    await asyncio.wait_for(writer, 30.0)

    fresh = await Router.connect(nats_server.url)
    await fresh.ready()
    assert len(fresh) == 250
    await eventually(lambda: router.snapshot() == fresh.snapshot(), timeout=15.0)
    await asyncio.gather(router.close(), fresh.close())


async def test_eight_routers_overbook_far_less_than_plain_least_loaded(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    # 80 jobs for 100 free slots, no availability update in between. Routers that cannot
    # talk to each other can at best spread at random: each worker then gets Binomial(8, 0.2)
    # jobs, about 13 overbooked in all; plain least-loaded sends everything to one worker.
    workers, slots, n_routers, jobs_each = 50, 2, 8, 10
    await publish(js, *(make_avail(f"w{i:02}", max_tasks=slots) for i in range(workers)))
    conns = [await connect(nats_server.url) for _ in range(n_routers)]
    routers = [Router(c, rng=random.Random(seed)) for seed, c in enumerate(conns)]
    await asyncio.gather(*(r.ready() for r in routers))

    ours: Counter[str] = Counter()
    naive: Counter[str] = Counter()

    async def dispatch(router: Router) -> None:
        fleet = list(router.snapshot().values())  # the same picture for the naive picker
        for _ in range(jobs_each):
            picked = router.pick("gpu")
            assert picked is not None
            ours[picked.worker_id] += 1
            naive[naive_pick(fleet)] += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(dispatch(r) for r in routers))
    over_ours, over_naive = overbooked(ours, slots), overbooked(naive, slots)
    jobs = sum(ours.values())
    print(f"overbooked: router {over_ours}, plain least-loaded {over_naive} of {jobs} jobs")
    assert over_naive == n_routers * jobs_each - slots
    assert over_ours <= 0.3 * over_naive  # 300 simulated runs: mean 13.5, max 22
    for c in conns:
        await c.close()


def naive_pick(fleet: list[Availability]) -> str:
    """Plain least-loaded: best load, ties by id, nothing counted between updates."""
    candidates = [a for a in fleet if a.available]
    best = min(
        candidates,
        key=lambda a: query.load_key(a.active_tasks, a.max_concurrent_tasks, a.worker_id),
    )
    return best.worker_id


def overbooked(assigned: Counter[str], slots: int) -> int:
    return sum(max(0, n - slots) for n in assigned.values())


# ---------------------------------------------------------------- forged availability


def _raw_availability(wid: str, subject_id: str | None = None, slots: int = 1) -> tuple[str, bytes]:
    """An availability body as anyone could publish it (no permissions on the server)."""
    body = {
        "v": 1, "worker_id": wid, "available": True, "status": "online", "capability": "hybrid",
        "supported_content_types": [], "active_tasks": 0, "max_concurrent_tasks": slots,
        "reason": "ok", "changed_at": "2026-11-28T12:00:00Z", "event_seq": 1,
    }  # fmt: skip
    return f"worker.available.{subject_id or wid}", json.dumps(body).encode()


async def test_forged_availability_with_absurd_numbers_never_enters_the_index(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    """A hybrid worker claiming a million free slots would take nearly every pick."""
    await publish(js, make_avail("w-real", capability="gpu", max_tasks=2, event_seq=1))
    await js.publish(*_raw_availability("x", slots=1_000_000))
    await js.publish(*_raw_availability("w-real", subject_id="y", slots=8))  # not y's body
    async with await Router.connect(nats_server.url) as router:
        assert router.get("x") is None and router.get("y") is None
        assert router.rejected == 2
        await js.publish(*_raw_availability("z", slots=1_000_000))  # while it follows
        await eventually(lambda: router.rejected == 3)
        picks = {(w.worker_id if w else None) for w in (router.pick("gpu") for _ in range(2))}
        assert len(router) == 1 and picks == {"w-real"}


async def test_availability_within_the_bounds_is_taken(
    nats_server: NatsServer, js: JetStreamContext
) -> None:
    await js.publish(*_raw_availability("x", slots=protocol.MAX_SLOTS))
    async with await Router.connect(nats_server.url) as router:
        x = router.get("x")
        assert x is not None and x.max_concurrent_tasks == protocol.MAX_SLOTS
        assert router.rejected == 0
