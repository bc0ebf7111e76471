"""Invariant 4: an event that does not decode or validate is acknowledged, logged
and recorded as rejected; every valid event around it is still applied."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from registry.server import projector
from registry.server.embedded import NatsServer
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    bounded,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    register_body,
    running_registry,
)

WID = "w-good"


def _garbage(inc: str) -> list[tuple[str, str, bytes]]:
    """(what, kind, body) for worker WID: none of them may be applied."""

    def hb(**changes: Any) -> dict[str, Any]:
        return {**heartbeat_body(WID, inc), **changes}

    def hb_metrics(**changes: Any) -> dict[str, Any]:
        body = heartbeat_body(WID, inc)
        return {**body, "metrics": {**body["metrics"], **changes}}

    def dumps(body: dict[str, Any] | list[Any]) -> bytes:
        return json.dumps(body).encode()

    reg = register_body(WID, inc)
    return [
        ("not json", "heartbeat", b"\x00this is {not json"),
        ("a json array", "heartbeat", dumps([1, 2, 3])),
        ("wrong type", "heartbeat", dumps(hb_metrics(cpu_usage_percent="high"))),
        ("unknown status", "heartbeat", dumps(hb(status="sleeping"))),
        ("cpu 150 %", "heartbeat", dumps(hb_metrics(cpu_usage_percent=150.0))),
        ("negative counter", "heartbeat", dumps(hb_metrics(completed_tasks=-1))),
        ("missing field", "heartbeat", dumps({k: v for k, v in hb().items() if k != "status"})),
        ("body id != subject id", "heartbeat", dumps(hb(worker_id="w-other"))),
        ("registration id != subject id", "register",
         dumps({**reg, "registration": {**reg["registration"], "worker_id": "w-other"}})),
        ("zero max tasks", "register",
         dumps({**reg, "registration": {**reg["registration"], "max_concurrent_tasks": 0}})),
        ("500 kB body", "heartbeat", dumps(hb(padding="x" * 500_000))),
        ("unsupported v", "heartbeat", dumps(hb(v=2))),
    ]  # fmt: skip


async def _feed(js: JetStreamContext) -> tuple[list[int], int, dict[str, Any]]:
    """Valid events with garbage between every two; (garbage seqs, last valid seq, metrics)."""
    inc = new_incarnation()
    garbage = _garbage(inc)
    valid: list[tuple[str, dict[str, Any]]] = [("register", register_body(WID, inc))] + [
        ("heartbeat", heartbeat_body(WID, inc, cpu=5.0 * n, completed_tasks=n))
        for n in range(1, len(garbage) + 1)
    ]
    bad_seqs: list[int] = []
    for (kind, body), (_, bad_kind, bad) in zip(valid, garbage, strict=False):
        last = await publish(js, kind, WID, body)
        bad_seqs.append((await publish(js, bad_kind, WID, bad)).seq)
    for kind, body in valid[len(garbage) :]:
        last = await publish(js, kind, WID, body)
    return bad_seqs, last.seq, valid[-1][1]["metrics"]


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Captured log entries; the projector gets a fresh logger so a logger cached
    by another test's structlog configuration cannot bypass the capture."""
    with pytest.MonkeyPatch.context() as mp, capture_logs() as captured:
        mp.setattr(projector, "log", structlog.get_logger("registry.projector"))
        yield captured


@bounded(30)
async def test_garbage_never_stops_valid_events(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url):
        _, last_seq, last_metrics = await _feed(js)
        rec = await eventually(lambda: folded(js, WID, last_seq), timeout=3.0)
    assert rec["event_seq"] == last_seq
    assert rec["version"] == 1 + len(_garbage("x"))  # register + every valid heartbeat
    assert {k: rec["metrics"][k] for k in last_metrics} == last_metrics
    assert rec["status"] == "online" and rec["registration"]["max_concurrent_tasks"] == 2


@bounded(30)
async def test_garbage_is_counted_as_rejected(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url) as registry:
        bad_seqs, last_seq, _ = await _feed(js)
        await eventually(lambda: folded(js, WID, last_seq), timeout=3.0)
        counters = registry.counters()
    assert counters["events_rejected"] == len(bad_seqs)
    assert counters["events_applied"] == 1 + len(bad_seqs)


@bounded(30)
async def test_rejected_event_is_logged_with_reason(
    nats_server: NatsServer, nc: Client, logs: list[dict[str, Any]]
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url):
        bad_seqs, last_seq, _ = await _feed(js)
        await eventually(lambda: folded(js, WID, last_seq), timeout=3.0)
    rejected = [e for e in logs if e["event"] == "event_rejected"]
    assert sorted(e["seq"] for e in rejected) == bad_seqs
    assert all(e["log_level"] == "warning" for e in rejected)
    assert all(isinstance(e["reason"], str) and e["reason"] for e in rejected)
    assert all(e["subject"].endswith(f".{WID}") for e in rejected)
    by_seq = {e["seq"]: e["reason"] for e in rejected}
    code = {e["seq"]: e["code"] for e in rejected}
    assert code[bad_seqs[4]] == code[bad_seqs[5]] == "invalid"  # cpu 150 %, a negative counter
    assert code[bad_seqs[7]] == "id_mismatch" and code[bad_seqs[10]] == "too_large"
    assert "w-other" in by_seq[bad_seqs[7]]  # mismatched ids
    assert "exceeds" in by_seq[bad_seqs[10]]  # 500 kB
    assert "v=2" in by_seq[bad_seqs[11]]
