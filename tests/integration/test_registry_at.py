"""`registry workers --at TIME` and `registry.at`: the fleet as the bucket held it then.

A fleet changes while a real registry folds it; the bucket is read at quiet moments;
the stream folded up to each moment (the same pure fold) must give the same records,
field by field, through the CLI and through the query service. A trimmed history is
said, not hidden.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from registry import protocol
from registry.server import service
from registry.server.app import Registry
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from registry.timeparse import format_instant
from tests.conftest import eventually
from tests.factories import View, heartbeat, publish_events, register
from tests.integration.registry_helpers import (
    bounded,
    bucket_records,
    folded,
    heartbeat_body,
    new_incarnation,
    publish,
    record,
    register_body,
    running_registry,
    unregister_body,
)
from tests.integration.test_ops import one_line, run


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """The registry runs in this process: its logs are kept out of the CLI's stdout."""
    with capture_logs():
        yield


def instant(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


async def quiet_snapshot(
    js: JetStreamContext, registry: Registry, seq: int
) -> tuple[str, dict[str, Any]]:
    """The bucket once event `seq` is folded, and a moment after it (nothing is published
    until the next phase)."""
    await eventually(lambda: registry.projector.counters.last_seq >= seq)
    await eventually(lambda: registry.projector.counters.pending == 0)
    snapshot = await bucket_records(js)
    return instant(datetime.now(UTC)), snapshot


async def cli_at(capsys: pytest.CaptureFixture[str], url: str, at: str, *flags: str) -> Any:
    code, out, err = await run(capsys, "workers", "--at", at, "--all", "--json", *flags,
                               "--nats", url)  # fmt: skip
    assert code == 0, err
    return json.loads(out)


async def service_at(nc: Client, at: str, limit: int = 500) -> tuple[dict[str, Any], list[Any]]:
    """Every page of `registry.at` from the start, asked with the answer's own `at`."""
    pages, after = [], None
    while True:
        body = {"at": at, "all": True, "limit": limit, "after": after}
        msg = await nc.request("registry.at", json.dumps(body).encode(), timeout=10.0)
        assert not (msg.headers or {}).get("Nats-Service-Error"), msg.headers
        page = json.loads(msg.data)
        pages.append(page)
        at, after = page["at"], page["next"]
        if after is None:
            return pages[0], [w for p in pages for w in p["workers"]]


def by_id(workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {w["registration"]["worker_id"]: w for w in workers}


@bounded(30)
async def test_the_fleet_at_each_moment_is_what_the_bucket_held_then(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    a, b, c, d = (new_incarnation() for _ in range(4))
    async with running_registry(nats_server.url, caught_up=True) as registry:
        await publish(js, "register", "a", register_body("a", a, tags={"zone": "eu"}))
        await publish(js, "register", "b", register_body("b", b, capability="cpu"))
        last = await publish(js, "heartbeat", "a", heartbeat_body("a", a, active_tasks=1))
        m1, s1 = await quiet_snapshot(js, registry, last.seq)

        await publish(js, "heartbeat", "b", heartbeat_body("b", b, status="busy"))
        await publish(js, "register", "c", register_body("c", c, heartbeat_interval_s=0.2))
        await publish(js, "heartbeat", "c", heartbeat_body("c", c, cpu=50.0))
        last = await publish(js, "register", "d", register_body("d", d, capability="hybrid"))
        await eventually(lambda: _offline(js, "c", "expired"), timeout=5.0)  # the sweeper's
        m2, s2 = await quiet_snapshot(js, registry, last.seq)

        await publish(js, "unregister", "d", unregister_body("d", d))
        last = await publish(js, "heartbeat", "a", heartbeat_body("a", a, active_tasks=2))
        m3, s3 = await quiet_snapshot(js, registry, last.seq)

        answers = [await cli_at(capsys, nats_server.url, m) for m in (m1, m2, m3)]
        first, paged = await service_at(nc, m2, limit=1)
        tables = [await run(capsys, "workers", "--at", m, "--nats", nats_server.url)
                  for m in (m2, m3)]  # fmt: skip
        gpus = await cli_at(capsys, nats_server.url, m2, "--capability", "gpu")

    assert [len(s) for s in (s1, s2, s3)] == [2, 4, 4]
    assert s2["c"]["offline_reason"] == "expired" and s3["d"]["offline_reason"] == "unregistered"
    for answer, snapshot in zip(answers, (s1, s2, s3), strict=True):
        assert by_id(answer["workers"]) == snapshot  # every field, version included
        assert (answer["reach"], answer["unknown"], answer["purged"]) == ({}, [], 0)
    assert by_id(paged) == s2 and len(paged) == 4  # four pages of one, one fold
    asked = datetime.fromisoformat(m2)
    to_ms = asked.replace(microsecond=asked.microsecond // 1000 * 1000)
    assert datetime.fromisoformat(first["at"]) == to_ms  # ask the next page with this
    assert first["through_seq"] == answers[1]["through_seq"] >= s2["c"]["event_seq"]
    assert sorted(by_id(gpus["workers"])) == ["a", "c"]
    (code2, table2, _), (code3, table3, err3) = tables
    assert code2 == code3 == 0
    assert [row.split()[1] for row in table2.splitlines()[1:]] == ["a", "b", "d"]  # c expired
    assert table2.splitlines()[0].split()[-1] == "HISTORY"
    assert [row.split()[1] for row in table3.splitlines()[1:]] == ["a", "b"]
    assert one_line(err3).endswith("; complete")
    assert f"as of {format_instant(datetime.fromisoformat(m3))}" in err3


async def _offline(js: JetStreamContext, wid: str, reason: str) -> bool:
    rec = await record(js, wid)
    return rec is not None and rec["offline_reason"] == reason


@bounded(30)
async def test_an_offline_record_is_left_out_once_the_registry_purged_it(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    inc = new_incarnation()
    async with running_registry(nats_server.url, caught_up=True, retention_s=0.5) as registry:
        await publish(js, "register", "p", register_body("p", inc))
        gone = await publish(js, "unregister", "p", unregister_body("p", inc))
        offline = await eventually(lambda: folded(js, "p", gone.seq))
        await eventually(lambda: registry.projector.counters.offline_purged == 1, timeout=5.0)
        after = instant(datetime.now(UTC))
        then = await cli_at(capsys, nats_server.url, offline["offline_at"], "--retention", "0.5")
        now = await cli_at(capsys, nats_server.url, after, "--retention", "0.5")
        service_now, _ = await service_at(nc, after)
    assert by_id(then["workers"]) == {"p": offline}
    assert (now["workers"], now["purged"]) == ([], 1)
    assert (service_now["workers"], service_now["purged"]) == ([], 1)  # the registry's retention


@bounded(30)
async def test_a_trimmed_history_is_said_not_hidden(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, nc: Client
) -> None:
    """The stream keeps 100 messages per worker and kind: 113 heartbeats later, the 3
    before the first moment are gone, and so are the 100 registrations of `u` after it."""
    js = nc.jetstream()
    t, u = new_incarnation(), new_incarnation()
    async with running_registry(nats_server.url, caught_up=True) as registry:
        await publish(js, "register", "t", register_body("t", t))
        await publish(js, "register", "u", register_body("u", u))
        for _ in range(3):
            last = await publish(js, "heartbeat", "t", heartbeat_body("t", t, active_tasks=1))
        m1, s1 = await quiet_snapshot(js, registry, last.seq)
        for _ in range(110):
            last = await publish(js, "heartbeat", "t", heartbeat_body("t", t, active_tasks=2))
        for _ in range(100):
            last = await publish(js, "register", "u", register_body("u", u))
        m2, s2 = await quiet_snapshot(js, registry, last.seq)
        early = await cli_at(capsys, nats_server.url, m1)
        late = await cli_at(capsys, nats_server.url, m2)
        code, table, err = await run(capsys, "workers", "--at", m1, "--nats", nats_server.url)
        page, _ = await service_at(nc, m1)

    # at m1 the bucket said 1 task; the fold has t's registration and none of its beats
    assert s1["t"]["metrics"]["active_tasks"] == 1
    assert by_id(early["workers"])["t"]["metrics"]["active_tasks"] == 0
    assert early["reach"] == {"t": {"trimmed": [], "missing": ["heartbeat"]}}
    assert early["unknown"] == ["u"] and "u" not in by_id(early["workers"])
    assert page["reach"] == early["reach"] and page["unknown"] == ["u"]
    assert page["unknown_count"] == 1 and page["max_msgs_per_subject"] == 100
    row = next(r for r in table.splitlines() if r.split()[1] == "t")
    assert code == 0 and row.endswith("incomplete (heartbeat)")
    assert "1 incomplete" in one_line(err) and "1 unknown" in err
    # at m2 the latest events are there: every field right but the count of events
    assert late["reach"] == {"t": {"trimmed": ["heartbeat"], "missing": []},
                             "u": {"trimmed": ["register"], "missing": []}}  # fmt: skip
    got = by_id(late["workers"])
    assert got["t"]["version"] < s2["t"]["version"] and got["u"]["version"] < s2["u"]["version"]
    assert {**got["t"], "version": 0} == {**s2["t"], "version": 0}
    # u re-registered one incarnation 101 times: the first registration, gone, set registered_at
    assert got["u"]["registered_at"] > s2["u"]["registered_at"]
    assert {**got["u"], "version": 0, "registered_at": ""} == {**s2["u"], "version": 0,
                                                                 "registered_at": ""}  # fmt: skip


async def test_a_bad_moment_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer
) -> None:
    for at, says in (("yesterday", "invalid time 'yesterday'"),
                     ("2999-01-01T00:00:00Z", "is in the future")):  # fmt: skip
        code, out, err = await run(capsys, "workers", "--at", at, "--nats", nats_server.url)
        assert (code, out) == (2, "") and says in one_line(err)


@bounded(20)
async def test_a_moment_before_the_first_event_is_one_line_exit_1_and_a_400(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True):
        code, _, empty = await run(capsys, "workers", "--at", "1h", "--nats", nats_server.url)
        await publish(js, "register", "a", register_body("a", new_incarnation()))
        code2, _, before = await run(capsys, "workers", "--at", "1h", "--nats", nats_server.url)
        msg = await nc.request("registry.at", b'{"at": "1h"}', timeout=5.0)
        bad = await nc.request("registry.at", b'{"at": "14:05"}', timeout=5.0)
    assert code == code2 == 1
    assert one_line(empty) == f"registry: {protocol.EVENTS_STREAM} holds no events"
    assert "nothing was stored by" in one_line(before) and "the oldest event" in before
    assert (msg.headers or {}).get("Nats-Service-Error-Code") == "400"
    assert "nothing was stored by" in (msg.headers or {}).get("Nats-Service-Error", "")
    assert (bad.headers or {}).get("Nats-Service-Error-Code") == "400"


async def test_the_service_refuses_to_fold_past_its_cap_and_names_the_cli(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await provision(nc)
    await publish_events(nc.jetstream(), register("a"), heartbeat("a"), heartbeat("a"))
    monkeypatch.setattr(service, "AT_MAX_EVENTS", 2)
    svc = await service.start_service(nc, View({}))
    try:
        msg = await nc.request("registry.at", b'{"at": "0s"}', timeout=5.0)
    finally:
        await svc.stop()
    headers = msg.headers or {}
    assert headers.get("Nats-Service-Error-Code") == "413"
    assert "more than 2 events" in headers["Nats-Service-Error"]
    assert "registry workers --at" in headers["Nats-Service-Error"]
