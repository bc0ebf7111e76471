"""The wire contract, pinned by golden files: decode them, re-encode, compare."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from registry import protocol
from registry.protocol import (
    AVAILABILITY_DECODER,
    CONTROL_DECODER,
    BadEvent,
    HeartbeatEvent,
    RegisterEvent,
    WorkerCapability,
    WorkerStatus,
    decode_event,
    encode,
)

GOLDEN = Path(__file__).parent.parent / "golden"


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


@pytest.mark.parametrize("kind", protocol.EVENT_KINDS)
def test_golden_event_round_trips_unchanged(kind: str) -> None:
    data = golden(f"{kind}.json")
    event = decode_event(f"worker.{kind}.gpu-box-1", data)
    assert type(event) is protocol.EVENT_TYPES[kind]
    assert json.loads(encode(event)) == json.loads(data)


def test_golden_availability_and_control_round_trip() -> None:
    for name, decoder in (("available.json", AVAILABILITY_DECODER), ("control.json", CONTROL_DECODER),
                          ("control_superseded.json", CONTROL_DECODER),
                          ("control_drain.json", CONTROL_DECODER)):  # fmt: skip
        data = golden(name)
        assert json.loads(encode(decoder.decode(data))) == json.loads(data)


def test_a_control_without_an_incarnation_is_for_whichever_process_listens() -> None:
    old = b'{"v":1,"action":"register","reason":"r"}'  # before the field was added
    assert CONTROL_DECODER.decode(old).incarnation == ""


def test_minimal_register_fills_defaults_and_ignores_unknown_fields() -> None:
    event = decode_event("worker.register.cpu-1", golden("minimal_register.json"))
    assert isinstance(event, RegisterEvent)
    reg = event.registration
    assert reg.capability is WorkerCapability.CPU
    assert reg.max_concurrent_tasks == 1
    assert reg.hardware.gpu_count == 0 and reg.hardware.gpu_models == []
    assert reg.location.port == 8000 and reg.location.is_remote is True
    assert reg.supported_content_types == [] and reg.tags == {}


def test_encoded_fields_use_the_plan_names() -> None:
    event = decode_event("worker.heartbeat.gpu-box-1", golden("heartbeat.json"))
    assert isinstance(event, HeartbeatEvent)
    body = json.loads(encode(event))
    assert set(body) == {"v", "worker_id", "incarnation", "sent_at", "status", "metrics"}
    assert body["status"] == WorkerStatus.BUSY.value
    assert body["sent_at"] == "2026-11-28T12:00:05Z"


HB = "worker.heartbeat.gpu-box-1"


@pytest.mark.parametrize(
    ("subject", "body", "reason"),
    [
        (HB, b"not json", "undecodable"),
        ("worker.unregister.gpu-box-1", golden("unregister.json").replace(b"shutdown", b"\xff"), "undecodable"),
        ("worker.heartbeat.other", golden("heartbeat.json"), "id_mismatch"),
        ("worker.bogus.gpu-box-1", golden("heartbeat.json"), "bad_subject"),
        ("worker.heartbeat.bad$id", golden("heartbeat.json"), "bad_subject"),
        (HB, golden("heartbeat.json").replace(b'"v":1', b'"v":2'), "unsupported_version"),
        (HB, golden("heartbeat.json").replace(b"41.5", b"150"), "invalid"),
        (HB, golden("heartbeat.json").replace(b"117", b"-1"), "invalid"),
        (HB, golden("heartbeat.json").replace(b'"busy"', b'"napping"'), "invalid"),
        (HB, golden("heartbeat.json").replace(b"41.5", b'"41.5"'), "invalid"),
        (HB, golden("heartbeat.json").replace(b"41.5", b"1e999"), "invalid"),
        (HB, golden("heartbeat.json").replace(b'"status":"busy",', b""), "invalid"),
        (HB, b"[" * 100_000, "too_large"),
        (HB, b" " * (protocol.MAX_EVENT_BYTES + 1), "too_large"),
    ],
)  # fmt: skip
def test_bad_events_are_refused_with_a_reason(subject: str, body: bytes, reason: str) -> None:
    """The reason is our own code (never the decoder's wording, which changes between
    releases); the message carries the detail."""
    with pytest.raises(BadEvent) as info:
        decode_event(subject, body)
    assert info.value.reason == reason
    assert reason in protocol.REJECT_REASONS and str(info.value)


def test_register_whose_registration_id_differs_is_refused() -> None:
    data = golden("register.json").replace(b'"worker_id":"gpu-box-1","name"', b'"worker_id":"x","name"')
    with pytest.raises(BadEvent) as info:
        decode_event("worker.register.gpu-box-1", data)
    assert info.value.reason == "id_mismatch" and "registration.worker_id" in str(info.value)


@pytest.mark.parametrize("good", ["a", "A-z_0-9", "x" * 128])
def test_valid_worker_ids(good: str) -> None:
    assert protocol.validate_worker_id(good) == good


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", ">", "x" * 129, "é"])
def test_invalid_worker_ids_are_refused_clearly(bad: str) -> None:
    with pytest.raises(protocol.InvalidWorkerId, match="invalid worker id"):
        protocol.validate_worker_id(bad)


def test_msg_ids_are_random_128_bit() -> None:
    ids = {protocol.new_msg_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 32 for i in ids)


def test_worker_info_decodes_what_it_encodes() -> None:
    event = decode_event("worker.register.gpu-box-1", golden("register.json"))
    assert isinstance(event, RegisterEvent)
    info = protocol.WorkerInfo(
        registration=event.registration, last_heartbeat=event.sent_at, registered_at=event.sent_at
    )
    assert protocol.WORKER_INFO_DECODER.decode(encode(info)) == info
    assert set(msgspec.json.decode(encode(info))) >= {
        "v", "registration", "status", "metrics", "last_heartbeat", "registered_at",
        "available", "event_seq", "incarnation", "offline_reason", "version",
    }  # fmt: skip


def _register_with(**registration: object) -> bytes:
    body = json.loads(golden("register.json"))
    body["registration"] = {**body["registration"], **registration}
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("field", "largest"),
    [
        ("max_concurrent_tasks", protocol.MAX_SLOTS),
        ("supported_content_types", ["text"] * protocol.MAX_LIST),
        ("hardware", {"cpu_cores": protocol.MAX_CPU_CORES, "memory_gb": protocol.MAX_GIB}),
    ],
)
def test_registration_at_the_bounds_decodes_and_past_them_is_invalid(
    field: str, largest: object
) -> None:
    decode_event("worker.register.gpu-box-1", _register_with(**{field: largest}))
    past: object
    if isinstance(largest, int):
        past = largest + 1
    elif isinstance(largest, list):
        past = [*largest, "text"]
    else:
        past = {"cpu_cores": protocol.MAX_CPU_CORES + 1, "memory_gb": 1.0}
    with pytest.raises(BadEvent) as e:
        decode_event("worker.register.gpu-box-1", _register_with(**{field: past}))
    assert e.value.reason == "invalid"


def test_heartbeat_interval_and_task_counts_are_bounded() -> None:
    body = json.loads(golden("register.json"))
    body["heartbeat_interval_s"] = protocol.MAX_HEARTBEAT_INTERVAL_S + 1
    with pytest.raises(BadEvent, match="heartbeat_interval_s"):
        decode_event("worker.register.gpu-box-1", json.dumps(body).encode())
    for name, largest in (("active_tasks", protocol.MAX_ACTIVE_TASKS),
                          ("completed_tasks", protocol.MAX_TASK_COUNT)):  # fmt: skip
        hb = json.loads(golden("heartbeat.json"))
        hb["metrics"][name] = largest
        decode_event(HB, json.dumps(hb).encode())
        hb["metrics"][name] = largest + 1
        with pytest.raises(BadEvent, match=name):
            decode_event(HB, json.dumps(hb).encode())


def test_availability_with_absurd_numbers_does_not_decode() -> None:
    body = json.loads(golden("available.json"))
    protocol.AVAILABILITY_DECODER.decode(json.dumps(body).encode())
    for name, absurd in (("max_concurrent_tasks", 1_000_000), ("active_tasks", 10**9)):
        with pytest.raises(msgspec.ValidationError, match=name):
            protocol.AVAILABILITY_DECODER.decode(json.dumps({**body, name: absurd}).encode())
