"""Prometheus metrics (`registry up --metrics-port`): scraped over HTTP with the
standard library and parsed with prometheus_client's own parser, while a real
registry folds real events. Values are held to what the registry did: the
bucket's records, the events published."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from registry.server.embedded import NatsServer
from tests.conftest import eventually, port_open
from tests.integration.registry_helpers import (
    bounded,
    heartbeat_body,
    new_incarnation,
    publish,
    record,
    register_body,
    registry_process,
    running_registry,
    unregister_body,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


async def scrape(port: int) -> Samples:
    """Every sample of one scrape, by (sample name, labels)."""
    text = await asyncio.to_thread(_fetch, port)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]




@bounded(60)
async def test_scrape_shows_workers_by_status_after_an_expiry(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True, metrics_port=0) as registry:
        port = registry.metrics_port
        assert port is not None and port > 0
        steady, silent = new_incarnation(), new_incarnation()
        await publish(js, "register", "gpu-1", register_body("gpu-1", steady,
                      heartbeat_interval_s=30.0, capability="gpu"))  # fmt: skip
        await publish(js, "register", "cpu-1", register_body("cpu-1", silent,
                      heartbeat_interval_s=0.1, capability="cpu"))  # fmt: skip
        await publish(js, "heartbeat", "gpu-1", heartbeat_body("gpu-1", steady))
        await eventually(lambda: _expired(js, "cpu-1"), timeout=20.0)

        async def settled() -> Samples | None:
            s = await scrape(port)
            done = value(s, "registry_workers", status="offline", capability="cpu") == 1
            return s if done and value(s, "registry_expiry_detection_seconds_count") >= 1 else None

        s = await eventually(settled, timeout=20.0, interval=0.2)
    assert value(s, "registry_workers", status="online", capability="gpu") == 1
    assert value(s, "registry_workers", status="online", capability="cpu") == 0
    assert value(s, "registry_workers_available", capability="gpu") == 1
    assert value(s, "registry_workers_available", capability="cpu") == 0
    assert value(s, "registry_events_folded_total", kind="register") == 2
    assert value(s, "registry_events_folded_total", kind="heartbeat") == 1
    assert value(s, "registry_events_folded_total", kind="expired") == 1
    assert value(s, "registry_expiries_published_total") == 1
    assert value(s, "registry_bucket_writes_total") >= 4  # 2 registers, 1 beat, 1 expiry
    assert value(s, "registry_event_to_bucket_seconds_count") >= 4
    assert 0 < value(s, "registry_event_to_bucket_seconds_sum") < 60
    assert value(s, "registry_brake_engaged") == 0
    assert value(s, "registry_expiries_held") == 0
    assert value(s, "registry_active") == 1
    assert value(s, "registry_lease_epoch") >= 1
    assert value(s, "registry_projector_sequence") >= 4


async def _expired(js: JetStreamContext, worker_id: str) -> bool:
    rec = await record(js, worker_id)
    return rec is not None and rec["offline_reason"] == "expired"


@bounded(60)
async def test_rejected_ignored_and_unregistered_events_are_counted_by_kind(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True, metrics_port=0) as registry:
        port = registry.metrics_port
        assert port is not None
        before = await scrape(port)
        await publish(js, "heartbeat", "w-1", b"not json")
        await publish(js, "heartbeat", "w-2", heartbeat_body("w-2", new_incarnation()))
        ack = await publish(js, "unregister", "w-3", unregister_body("w-3", new_incarnation()))
        await eventually(lambda: registry.projector.counters.last_seq >= ack.seq, timeout=20.0)
        after = await scrape(port)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0.0)

    assert grew("registry_events_rejected_total", kind="heartbeat", code="undecodable") == 1
    assert grew("registry_events_unregistered_total", kind="heartbeat") == 1
    assert grew("registry_events_ignored_total", kind="unregister") == 1
    assert grew("registry_events_folded_total", kind="heartbeat") == 0
    assert value(after, "registry_projector_lag_events") == 0


@bounded(60)
async def test_each_registry_in_a_process_has_its_own_metrics(nats_server: NatsServer) -> None:
    """Two registries in one process (one active, one standing by): no clash of
    metric names, and each reports its own role."""
    async with (
        running_registry(nats_server.url, caught_up=True, metrics_port=0, instance="a") as a,
        running_registry(nats_server.url, metrics_port=0, instance="b") as b,
    ):
        assert a.metrics_port is not None and b.metrics_port is not None
        first, second = await scrape(a.metrics_port), await scrape(b.metrics_port)
    assert value(first, "registry_active") == 1 and value(first, "registry_lease_epoch") >= 1
    assert value(second, "registry_active") == 0 and value(second, "registry_lease_epoch") == 0


def _metrics_port(events: list[dict[str, object]]) -> int | None:
    for e in events:
        if e.get("event") == "metrics_serving":
            return int(str(e["url"]).rsplit(":", 1)[1].split("/", 1)[0])
    return None


@bounded(60)
async def test_up_serves_metrics_and_stops_them_on_sigterm(tmp_path: Path) -> None:
    args = ["--port", "0", "--data-dir", str(tmp_path / "data"), "--metrics-port", "0"]
    async with registry_process(args, tmp_path / "stderr.log") as proc:
        url = await proc.first_line()
        port = await eventually(lambda: _metrics_port(proc.log_events()), timeout=15.0)
        nc = await nats.connect(url)
        try:
            inc = new_incarnation()
            await publish(nc.jetstream(), "register", "gpu-9", register_body("gpu-9", inc))

            async def online() -> bool:
                s = await scrape(port)
                return value(s, "registry_workers", status="online", capability="gpu") == 1

            await eventually(online, timeout=20.0, interval=0.2)
            s = await scrape(port)
        finally:
            await nc.close()
        code = await proc.terminate()
    assert code == 0
    assert value(s, "registry_active") == 1
    assert value(s, "registry_events_folded_total", kind="register") == 1
    assert not port_open(port)
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()


@bounded(60)
async def test_up_with_a_taken_metrics_port_is_a_one_line_error(
    tmp_path: Path, taken_port: int
) -> None:
    args = ["--port", "0", "--data-dir", str(tmp_path / "data"),
            "--metrics-port", str(taken_port)]  # fmt: skip
    async with registry_process(args, tmp_path / "stderr.log") as proc:
        code = await proc.wait(30.0)
    text = (tmp_path / "stderr.log").read_text()
    assert code == 1
    errors = [line for line in text.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and str(taken_port) in errors[0], errors
    assert "Traceback" not in text
