"""Operator commands against a real nats-server, through a small `main(argv)` harness."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from registry import fold, protocol
from registry.eventlog import EventQuery, read_events
from registry.ops.commands import add_commands
from registry.protocol import WorkerInfo
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from registry.server.service import start_service
from tests.factories import (
    FLEET,
    View,
    expired,
    heartbeat,
    make_info,
    publish_events,
    register,
    unregister,
)


def ops_main(argv: list[str]) -> int:
    """What `registry <command> ...` does: parse with add_commands, then args.run(args)."""
    parser = argparse.ArgumentParser(prog="registry")
    add_commands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    code: int = args.run(args)
    return code


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(ops_main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
async def js(nc: Client) -> JetStreamContext:
    await provision(nc)
    return nc.jetstream()


@pytest.fixture
async def fleet(js: JetStreamContext) -> list[WorkerInfo]:
    kv = await js.key_value(protocol.BUCKET)
    for r in FLEET:
        await kv.put(r.worker_id, protocol.encode(r))
    return FLEET


async def project(js: JetStreamContext, worker_id: str) -> WorkerInfo:
    """Fold the worker's events as the projector would, and store the record."""
    record = None
    for e in await read_events(js._nc, EventQuery(worker_id=worker_id, limit=1000)):
        outcome = fold.evolve(record, e.event, e.seq, e.time)
        if isinstance(outcome, fold.Applied):
            record = outcome.record
    assert record is not None
    kv = await js.key_value(protocol.BUCKET)
    await kv.put(worker_id, protocol.encode(record))
    return record


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- workers


async def test_workers_prints_a_table_of_live_workers(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    code, out, _ = await run(capsys, "workers", "--nats", nats_server.url)
    header, *rows = out.strip().splitlines()
    assert code == 0
    assert header.split() == [
        "NAME", "ID", "CAPABILITY", "STATUS", "TASKS", "CPU%", "MEM%", "GPU%", "LAST", "HEARTBEAT",
        "HOST",
    ]  # fmt: skip
    assert [r.split()[1] for r in rows] == ["c1", "g1", "g2", "h1"]
    assert rows[3].split()[3:5] == ["online", "(full)"]
    assert rows[1].split()[4:6] == ["0/2", "12"]


async def test_workers_all_shows_offline_records(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    _, out, _ = await run(capsys, "workers", "--all", "--nats", nats_server.url)
    assert "offline (expired)" in out and "offline (unregistered)" in out


async def test_workers_json_decodes_to_records(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    _, out, _ = await run(
        capsys, "workers", "--json", "--capability", "gpu", "--nats", nats_server.url
    )
    records = msgspec.json.decode(out, type=list[WorkerInfo])
    assert [r.worker_id for r in records] == ["g1", "g2"]


async def test_workers_filters_by_tag_and_availability(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    _, out, _ = await run(
        capsys, "workers", "--json", "--available", "--tag", "zone=us", "--nats", nats_server.url
    )
    assert [r["registration"]["worker_id"] for r in json.loads(out)] == ["c1"]


async def test_workers_bad_tag_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    code, out, err = await run(capsys, "workers", "--tag", "zone", "--nats", nats_server.url)
    assert (code, out) == (2, "")
    assert one_line(err) == "registry: invalid tag 'zone': use key=value"


async def test_bad_flag_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await run(capsys, "workers", "--capability", "tpu")
    assert code == 2
    assert one_line(err).startswith(
        "registry workers: argument --capability: invalid choice: 'tpu'"
    )


async def test_a_cluster_is_given_as_several_urls_and_a_dead_one_is_skipped(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    for servers in (f"nats://127.0.0.1:1,{nats_server.url}", f"{nats_server.url},nats://127.0.0.1:1"):
        code, out, _ = await run(capsys, "workers", "--json", "--nats", servers)
        assert code == 0 and len(json.loads(out)) == 4


async def test_a_bad_url_in_the_server_list_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = await run(capsys, "workers", "--nats", "nats://127.0.0.1:4222,http://x:1")
    assert (code, out) == (2, "")
    assert "'http://x:1'" in one_line(err)


# ---------------------------------------------------------------- get


async def test_get_prints_the_bucket_value(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    code, out, _ = await run(capsys, "get", "g2", "--nats", nats_server.url)
    assert code == 0
    assert msgspec.json.decode(out, type=WorkerInfo) == FLEET[1]


async def test_get_unknown_id_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    code, out, err = await run(capsys, "get", "nobody", "--nats", nats_server.url)
    assert (code, out) == (1, "")
    assert one_line(err) == "registry: no worker with id 'nobody'"


async def test_get_invalid_id_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await run(capsys, "get", "a.b")
    assert code == 2 and "invalid worker id" in one_line(err)


async def test_unreachable_server_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    code, out, err = await run(capsys, "get", "g1", "--nats", "nats://127.0.0.1:1")
    assert (code, out) == (1, "")
    assert one_line(err) == (
        "registry: cannot reach NATS at nats://127.0.0.1:1: "
        "connection refused (is nats-server running?)"
    )
    assert time.monotonic() - t0 < 3.0


async def test_missing_bucket_is_one_clear_line(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer
) -> None:
    code, _, err = await run(capsys, "workers", "--nats", nats_server.url)
    assert code == 1
    assert one_line(err) == "registry: no bucket 'workers': has the registry been started here?"


# ---------------------------------------------------------------- stats


async def test_stats_counts_the_bucket_without_the_service(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    code, out, err = await run(capsys, "stats", "--json", "--nats", nats_server.url)
    assert code == 0 and err == ""
    assert json.loads(out) == {
        "total": 4, "online": 3, "offline": 2, "busy": 1, "gpu_workers": 2, "cpu_workers": 1,
        "hybrid_workers": 1, "available": 2,
    }  # fmt: skip


async def test_stats_table_notes_a_missing_service(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    code, out, err = await run(capsys, "stats", "--nats", nats_server.url)
    assert code == 0
    assert out.splitlines()[0].split() == ["total", "4"]
    assert "projector counters left out" in one_line(err)


async def test_stats_include_the_service_counters_when_it_answers(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, nc: Client, fleet: list[WorkerInfo]
) -> None:
    service = await start_service(nc, View({r.worker_id: r for r in fleet}))
    try:
        _, out, _ = await run(capsys, "stats", "--json", "--nats", nats_server.url)
    finally:
        await service.stop()
    stats = json.loads(out)
    assert (stats["total"], stats["events_applied"], stats["events_rejected"], stats["lag"]) == (
        4,
        42,
        3,
        0,
    )


class _Standby(View):
    def lease(self) -> dict[str, object]:
        return {"instance": "reg-b", "role": "standby", "lease_ttl_s": 3,
                "active": {"holder": "reg-a", "epoch": 7, "since": "2026-12-07T06:00:00+00:00"}}  # fmt: skip


async def test_stats_say_which_registry_is_active_and_which_answered(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, nc: Client, fleet: list[WorkerInfo]
) -> None:
    service = await start_service(nc, _Standby({r.worker_id: r for r in fleet}))
    try:
        _, table, _ = await run(capsys, "stats", "--nats", nats_server.url)
        _, out, _ = await run(capsys, "stats", "--json", "--nats", nats_server.url)
    finally:
        await service.stop()
    lines = {line.split()[0]: line.split(None, 1)[1] for line in table.splitlines()}
    assert lines["active_registry"] == "reg-a (epoch 7, since 2026-12-07T06:00:00+00:00)"
    assert lines["answered_by"] == "reg-b (standby)"
    assert json.loads(out)["registry"]["active"]["holder"] == "reg-a"


# ---------------------------------------------------------------- events


async def test_events_for_one_worker(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    seqs = await publish_events(
        js, register("a"), register("b"), heartbeat("a", active=1), unregister("a")
    )
    code, out, _ = await run(capsys, "events", "--worker", "a", "--nats", nats_server.url)
    header, *rows = out.strip().splitlines()
    assert code == 0 and header.split() == ["SEQ", "STORED", "KIND", "WORKER", "SUMMARY"]
    assert [(int(r.split()[0]), r.split()[2], r.split()[3]) for r in rows] == [
        (seqs[0], "register", "a"), (seqs[2], "heartbeat", "a"), (seqs[3], "unregister", "a"),
    ]  # fmt: skip
    assert rows[2].endswith("unregistered: shutdown")


async def test_events_filter_by_kind_and_limit_keeps_the_latest(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    seqs = await publish_events(js, register("a"), *(heartbeat(w) for w in "abcab"))
    code, out, _ = await run(
        capsys, "events", "--kind", "heartbeat", "--limit", "3", "--json", "--nats", nats_server.url
    )
    assert code == 0
    assert [(e["seq"], e["worker_id"]) for e in json.loads(out)] == [
        (seqs[3], "c"), (seqs[4], "a"), (seqs[5], "b"),
    ]  # fmt: skip


async def test_events_on_an_empty_stream_say_so(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    code, out, err = await run(capsys, "events", "--nats", nats_server.url)
    assert (code, out, one_line(err)) == (0, "", "no events match")


async def test_events_tail_reaches_back_past_other_kinds(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    first = await publish_events(js, register("a"))
    await publish_events(js, *(heartbeat("a") for _ in range(50)))
    code, out, _ = await run(
        capsys, "events", "--kind", "register", "--limit", "2", "--json", "--nats", nats_server.url
    )
    assert code == 0 and [e["seq"] for e in json.loads(out)] == first


async def test_events_since_the_future_is_empty(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish_events(js, register("a"))
    code, out, err = await run(
        capsys, "events", "--since", "2099-01-01T00:00:00Z", "--nats", nats_server.url
    )
    assert (code, out, one_line(err)) == (0, "", "no events match")


async def test_events_bad_time_range_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await run(capsys, "events", "--since", "1h", "--until", "2h")
    assert code == 2 and one_line(err).startswith("registry: bad time range: --since")


async def test_events_bad_time_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = await run(capsys, "events", "--since", "yesterday")
    assert code == 2 and "invalid time 'yesterday'" in one_line(err)


async def test_events_of_one_worker_among_200k_others_answer_within_a_second(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, nc: Client, js: JetStreamContext
) -> None:
    others, per_worker = 2500, 80  # the stream keeps 100 events per subject
    await publish_events(js, register("needle"))
    body = protocol.encode(heartbeat("WID")).decode()
    for i in range(others):
        data = body.replace("WID", f"o{i}").encode()
        for _ in range(per_worker):
            await nc.publish(f"worker.heartbeat.o{i}", data)  # bulk load: core publish
        if i % 100 == 99:
            await nc.flush()
    await publish_events(js, heartbeat("needle", "busy"))

    async def stored() -> bool:
        return (
            await js.stream_info(protocol.EVENTS_STREAM)
        ).state.messages == others * per_worker + 2

    from tests.conftest import eventually

    await eventually(stored, timeout=20.0, interval=0.2)
    t0 = time.perf_counter()
    code, out, _ = await run(capsys, "events", "--worker", "needle", "--nats", nats_server.url)
    elapsed = time.perf_counter() - t0
    assert code == 0 and len(out.strip().splitlines()) == 3
    assert elapsed < 1.0, f"{elapsed:.2f} s"


# ---------------------------------------------------------------- explain


async def test_explain_an_expired_worker(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish_events(js, register("w", heartbeat_interval_s=0.1), heartbeat("w"))
    last = (await project(js, "w")).last_heartbeat
    await asyncio.sleep(0.3)  # the silence the expiry claims: the fold checks stored times
    await publish_events(js, expired("w", last, timeout_s=0.3))
    await project(js, "w")
    code, out, _ = await run(capsys, "explain", "w", "--nats", nats_server.url)
    assert code == 0
    assert "OFFLINE: expired at" in out
    assert (
        f"no heartbeat since {protocol_time(last)} (timeout 0.3s; it promised one every 0.1s)"
        in out
    )
    assert "registered 'w-name' capability=gpu slots=2" in out


async def test_explain_a_full_worker(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish_events(js, register("w"), heartbeat("w", active=1), heartbeat("w", active=2))
    await project(js, "w")
    _, out, _ = await run(capsys, "explain", "w", "--nats", nats_server.url)
    assert "NOT AVAILABLE: full, 2/2 tasks; last heartbeat" in out
    assert "now not available: full, 2/2 tasks (status=online tasks=2" in out


async def test_explain_an_unregistered_worker_gives_the_reason(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish_events(js, register("w"), unregister("w", reason="maintenance window"))
    await project(js, "w")
    _, out, _ = await run(capsys, "explain", "w", "--nats", nats_server.url)
    assert "OFFLINE: unregistered at" in out and "reason: maintenance window" in out


async def test_explain_says_why_an_event_was_ignored(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish_events(js, register("w", incarnation="old"), register("w", incarnation="new"))
    await publish_events(js, heartbeat("w", incarnation="old"))
    await project(js, "w")
    _, out, _ = await run(capsys, "explain", "w", "--json", "--nats", nats_server.url)
    timeline = [line["what"] for line in json.loads(out)["timeline"]]
    assert timeline[1].startswith("re-registered by a new process (incarnation old is superseded")
    assert timeline[2].startswith("IDENTITY CLASH: two processes claim this id")
    assert "stale incarnation: heartbeat from a process that was replaced" in timeline[2]


async def test_explain_and_events_say_a_forged_expiry_came_before_the_silence(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext
) -> None:
    await publish_events(js, register("w"), heartbeat("w"))
    last = (await project(js, "w")).last_heartbeat
    await publish_events(js, expired("w", last, timeout_s=15.0))  # stored at once
    assert (await project(js, "w")).live
    _, out, _ = await run(capsys, "explain", "w", "--json", "--nats", nats_server.url)
    timeline = [line["what"] for line in json.loads(out)["timeline"]]
    assert timeline[-1].startswith("ignored expired: verdict before the worker was silent for 15s")
    _, out, _ = await run(capsys, "events", "--worker", "w", "--kind", "expired", "--json",
                          "--nats", nats_server.url)  # fmt: skip
    (event,) = json.loads(out)
    assert "IGNORED: verdict before the worker was silent for 15s" in event["summary"]


async def test_explain_unknown_id_is_exit_1(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, fleet: list[WorkerInfo]
) -> None:
    code, _, err = await run(capsys, "explain", "nobody", "--nats", nats_server.url)
    assert code == 1 and one_line(err) == "registry: no worker with id 'nobody'"


def protocol_time(t: object) -> str:
    from registry.timeparse import format_instant

    return format_instant(t)  # type: ignore[arg-type]


# ---------------------------------------------------------------- watch


async def watch_while(
    capsys: pytest.CaptureFixture[str], url: str, js: JetStreamContext, *changes: WorkerInfo
) -> tuple[int, list[str]]:
    """Run `registry watch` for 1.5 s and write `changes` to the bucket meanwhile."""
    task = asyncio.create_task(run(capsys, "watch", "--duration", "1.5", "--nats", url))
    await asyncio.sleep(0.6)
    kv = await js.key_value(protocol.BUCKET)
    for record in changes:
        await kv.put(record.worker_id, protocol.encode(record))
    code, out, _ = await asyncio.wait_for(task, 10.0)
    return code, out.splitlines()


async def test_watch_appends_a_row_per_change_when_not_a_terminal(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext,
    fleet: list[WorkerInfo],
) -> None:  # fmt: skip
    new = make_info("n1", capability="cpu", event_seq=9)
    code, lines = await watch_while(capsys, nats_server.url, js, new)
    assert code == 0
    assert lines[0].startswith("NAME") and len(lines) == 1 + 4 + 1
    assert lines[-1].split()[1:4] == ["n1", "cpu", "online"]
    assert lines[-1].index("cpu") == lines[0].index("CAPABILITY")  # the header's columns


async def test_watch_ignores_load_figures_of_a_heartbeat(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext,
    fleet: list[WorkerInfo],
) -> None:  # fmt: skip
    busier = msgspec.structs.replace(
        FLEET[0], metrics=msgspec.structs.replace(FLEET[0].metrics, cpu_usage_percent=99.0)
    )
    gone = make_info("g2", offline_reason="expired", event_seq=9)
    _, lines = await watch_while(capsys, nats_server.url, js, busier, gone)
    assert len(lines) == 1 + 4 + 1
    assert lines[-1].split()[1:5] == ["g2", "gpu", "offline", "(expired)"]


async def test_watch_redraws_in_place_on_a_terminal(
    capsys: pytest.CaptureFixture[str], nats_server: NatsServer, js: JetStreamContext,
    fleet: list[WorkerInfo], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, lines = await watch_while(capsys, nats_server.url, js, make_info("n1", event_seq=9))
    out = "\n".join(lines)
    assert code == 0
    assert out.count("\x1b[H\x1b[2J") >= 2  # first draw, then redrawn after the change
    assert "4 workers" in out and "5 workers" in out
