"""The `worker-registry` micro service against a real nats-server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client
from nats.micro.service import Service

from registry.protocol import WorkerInfo
from registry.server.provision import provision
from registry.server.service import start_service
from tests.factories import FLEET, View, heartbeat, make_info, publish_events, register

# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def service(nc: Client) -> AsyncIterator[Service]:
    await provision(nc)
    svc = await start_service(nc, View({r.worker_id: r for r in FLEET}))
    yield svc
    await svc.stop()


async def ask(nc: Client, endpoint: str, body: object | bytes = b"") -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(f"registry.{endpoint}", data, timeout=5.0)
    assert not (msg.headers or {}).get("Nats-Service-Error"), msg.headers
    return json.loads(msg.data)


async def ask_error(nc: Client, endpoint: str, body: bytes) -> tuple[str, str]:
    msg = await nc.request(f"registry.{endpoint}", body, timeout=5.0)
    headers = msg.headers or {}
    return headers.get("Nats-Service-Error-Code", ""), headers.get("Nats-Service-Error", "")


# ---------------------------------------------------------------- discovery


async def test_ping_answers_with_the_service_name(nc: Client, service: Service) -> None:
    msg = await nc.request("$SRV.PING.worker-registry", b"", timeout=2.0)
    assert json.loads(msg.data)["name"] == "worker-registry"


async def test_info_lists_every_endpoint(nc: Client, service: Service) -> None:
    info = json.loads((await nc.request("$SRV.INFO.worker-registry", b"", timeout=2.0)).data)
    subjects = {e["subject"] for e in info["endpoints"]}
    assert info["name"] == "worker-registry"
    assert subjects == {f"registry.{n}" for n in ("list", "get", "stats", "pick", "history", "at")}


async def test_stats_verb_counts_requests_per_endpoint(nc: Client, service: Service) -> None:
    await ask(nc, "stats", {})
    stats = json.loads((await nc.request("$SRV.STATS.worker-registry", b"", timeout=2.0)).data)
    by_name = {e["name"]: e["num_requests"] for e in stats["endpoints"]}
    assert by_name["stats"] == 1


# ---------------------------------------------------------------- list / get / stats / pick


async def test_list_shows_live_workers(nc: Client, service: Service) -> None:
    answer = await ask(nc, "list", {})
    assert [w["registration"]["worker_id"] for w in answer["workers"]] == ["c1", "g1", "g2", "h1"]
    assert answer["next"] is None  # the whole fleet fits in one page


async def test_list_takes_an_empty_body(nc: Client, service: Service) -> None:
    assert len((await ask(nc, "list"))["workers"]) == 4


async def test_list_filters_and_all(nc: Client, service: Service) -> None:
    gpus = await ask(nc, "list", {"capability": "gpu", "all": True})
    assert [w["registration"]["worker_id"] for w in gpus["workers"]] == ["g1", "g2", "x1"]
    eu = await ask(nc, "list", {"tag": "zone=eu", "available": True})
    assert [w["registration"]["worker_id"] for w in eu["workers"]] == ["g1"]


async def test_get_returns_the_record(nc: Client, service: Service) -> None:
    record = await ask(nc, "get", {"worker_id": "g2"})
    assert record["registration"]["worker_id"] == "g2"
    assert record["status"] == "busy"


async def test_get_unknown_id_is_a_404(nc: Client, service: Service) -> None:
    code, text = await ask_error(nc, "get", b'{"worker_id": "nobody"}')
    assert (code, text) == ("404", "no worker with id 'nobody'")


async def test_get_invalid_id_is_a_400(nc: Client, service: Service) -> None:
    code, text = await ask_error(nc, "get", b'{"worker_id": "a.b"}')
    assert code == "400" and "invalid worker id" in text


async def test_bad_json_is_a_400(nc: Client, service: Service) -> None:
    code, text = await ask_error(nc, "list", b"{not json")
    assert code == "400" and text.startswith("bad request: JSON is malformed")


async def test_wrong_field_type_is_a_400(nc: Client, service: Service) -> None:
    code, text = await ask_error(nc, "list", b'{"available": "yes"}')
    assert code == "400" and "$.available" in text


async def test_stats_count_the_fleet_and_carry_projector_counters(
    nc: Client, service: Service
) -> None:
    assert await ask(nc, "stats", {}) == {
        "total": 4, "online": 3, "offline": 2, "busy": 1, "gpu_workers": 2, "cpu_workers": 1,
        "hybrid_workers": 1, "available": 2,
        "events_applied": 42, "events_rejected": 3, "pending": 0, "lag": 0,
    }  # fmt: skip


async def test_pick_returns_an_available_worker(nc: Client, service: Service) -> None:
    answer = await ask(nc, "pick", {"capability": "gpu", "content_type": "video"})
    assert answer["worker"]["registration"]["worker_id"] == "g1"


async def test_pick_returns_null_when_nobody_fits(nc: Client, service: Service) -> None:
    assert await ask(nc, "pick", {"capability": "hybrid"}) == {"worker": None}


async def test_pick_refuses_an_unknown_capability(nc: Client, service: Service) -> None:
    code, text = await ask_error(nc, "pick", b'{"capability": "tpu"}')
    assert code == "400" and "capability" in text


async def list_pages(nc: Client, body: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Every page of a listing, following `next` until null, with each page's size."""
    pages, after = [], None
    while True:
        msg = await nc.request("registry.list", json.dumps({**body, "after": after}).encode(), 5.0)
        assert not (msg.headers or {}).get("Nats-Service-Error"), msg.headers
        pages.append((len(msg.data), json.loads(msg.data)))
        if (after := pages[-1][1]["next"]) is None:
            return pages


@pytest.fixture
async def ten_thousand(nc: Client) -> AsyncIterator[dict[str, WorkerInfo]]:
    zones = ("eu", "us", "ap")
    fleet = {
        f"w{i:05d}": make_info(
            f"w{i:05d}", capability=("gpu", "cpu", "hybrid")[i % 3], tags={"zone": zones[i % 3]},
            active=i // 3 % 3, max_tasks=2, offline_reason="expired" if i % 10 == 9 else None,
        )
        for i in range(10_000)
    }  # fmt: skip
    service = await start_service(nc, View(fleet))
    yield fleet
    await service.stop()


async def test_a_fleet_over_max_payload_lists_in_pages_each_under_it(
    nc: Client, ten_thousand: dict[str, WorkerInfo]
) -> None:
    pages = await list_pages(nc, {"all": True, "limit": 5000})
    ids = [w["registration"]["worker_id"] for _, page in pages for w in page["workers"]]
    assert ids == sorted(ten_thousand)  # each once, in id order
    assert len(pages) > 10_000 * 890 // nc.max_payload  # a page shrinks to fit
    assert all(size <= nc.max_payload for size, _ in pages)
    assert pages[-1][1]["next"] is None


async def test_pages_default_to_500_live_workers(
    nc: Client, ten_thousand: dict[str, WorkerInfo]
) -> None:
    pages = await list_pages(nc, {})
    # the last live worker is not the last id (w09999 is offline): one empty page ends it
    assert [len(page["workers"]) for _, page in pages] == [500] * 18 + [0]


async def test_a_page_with_a_filter_walks_a_bounded_stretch(
    nc: Client, ten_thousand: dict[str, WorkerInfo]
) -> None:
    first = await ask(nc, "list", {"tag": "zone=ap", "available": True, "limit": 10})
    assert [w["registration"]["worker_id"] for w in first["workers"]][:3] == [
        "w00002", "w00005", "w00011",
    ]  # fmt: skip
    assert first["next"] == first["workers"][-1]["registration"]["worker_id"]
    pages = await list_pages(nc, {"tag": "zone=ap", "available": True, "limit": 5000})
    ids = [w["registration"]["worker_id"] for _, page in pages for w in page["workers"]]
    expected = [
        wid for wid, r in sorted(ten_thousand.items())
        if r.registration.tags["zone"] == "ap" and r.available
    ]  # fmt: skip
    assert ids == expected
    assert len(pages) == 2  # 5,000 records looked at per request, at most


async def test_a_page_with_no_match_still_moves_the_cursor(
    nc: Client, ten_thousand: dict[str, WorkerInfo]
) -> None:
    answer = await ask(nc, "list", {"tag": "zone=mars"})
    assert answer == {"workers": [], "next": "w04999"}
    assert await ask(nc, "list", {"tag": "zone=mars", "after": "w04999"}) == {
        "workers": [], "next": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"limit": 0}', "$.limit"),
        (b'{"limit": 5001}', "$.limit"),
        (b'{"limit": "ten"}', "$.limit"),
        (b'{"after": "a.b"}', "invalid worker id"),
        (b'{"after": 7}', "$.after"),
    ],
)
async def test_a_bad_limit_or_cursor_is_a_400(
    nc: Client, service: Service, body: bytes, expected: str
) -> None:
    code, text = await ask_error(nc, "list", body)
    assert code == "400" and expected in text


async def test_a_request_body_over_64_kib_is_a_400_before_decoding(
    nc: Client, service: Service
) -> None:
    code, text = await ask_error(nc, "pick", b"{" + b" " * 70_000 + b"}")
    assert (code, text) == ("400", "request body of 70002 bytes exceeds 65536")


async def test_unknown_request_fields_are_ignored(nc: Client, service: Service) -> None:
    answer = await ask(nc, "list", {"capability": "cpu", "colour": "blue"})
    assert [w["registration"]["worker_id"] for w in answer["workers"]] == ["c1"]


# ---------------------------------------------------------------- history


async def test_history_returns_only_that_workers_events_in_order(
    nc: Client, service: Service
) -> None:
    js = nc.jetstream()
    await publish_events(
        js, register("g1"), register("c1"), heartbeat("g1", "busy"), heartbeat("c1")
    )
    answer = await ask(nc, "history", {"worker_id": "g1"})
    assert [(e["kind"], e["worker_id"]) for e in answer["events"]] == [
        ("register", "g1"), ("heartbeat", "g1"),
    ]  # fmt: skip
    assert answer["events"][1]["event"]["status"] == "busy"
    assert answer["events"][1]["summary"].startswith("status=busy tasks=0")


async def test_history_limit_keeps_the_latest(nc: Client, service: Service) -> None:
    js = nc.jetstream()
    seqs = await publish_events(js, register("g1"), *(heartbeat("g1", active=i) for i in range(5)))
    answer = await ask(nc, "history", {"worker_id": "g1", "limit": 2})
    assert [e["seq"] for e in answer["events"]] == seqs[-2:]


async def test_history_since_skips_older_events(nc: Client, service: Service) -> None:
    js = nc.jetstream()
    await publish_events(js, register("g1"))
    answer = await ask(nc, "history", {"worker_id": "g1", "since": "2099-01-01T00:00:00Z"})
    assert answer == {"events": []}
    assert len((await ask(nc, "history", {"worker_id": "g1", "since": "1h"}))["events"]) == 1


async def test_history_bad_range_is_a_400(nc: Client, service: Service) -> None:
    code, text = await ask_error(
        nc, "history", b'{"worker_id": "g1", "since": "1h", "until": "2h"}'
    )
    assert code == "400" and text.startswith("bad time range")


async def test_history_of_an_unknown_worker_is_a_404(nc: Client, service: Service) -> None:
    code, _ = await ask_error(nc, "history", b'{"worker_id": "nobody"}')
    assert code == "404"


async def test_history_marks_a_rejected_event(nc: Client, service: Service) -> None:
    await nc.jetstream().publish("worker.heartbeat.g1", b'{"v": 1}')
    [event] = (await ask(nc, "history", {"worker_id": "g1"}))["events"]
    assert event["event"] is None and event["summary"].startswith("rejected: invalid heartbeat")
