"""Agent settings and identity: validated once, ids stable across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent import Agent
from agent.probe import Prober
from agent.settings import AgentSettings, build_registration, derive_worker_id
from registry import protocol
from registry.protocol import WorkerCapability
from tests.unit.fakes import FakeGpu, FakeNvml


def test_derived_id_is_stable_and_a_subject_token() -> None:
    first = derive_worker_id("gpu-box-1", "node7")
    assert first == derive_worker_id("gpu-box-1", "node7") == "gpu-box-1-node7"
    assert protocol.validate_worker_id(first) == first


@pytest.mark.parametrize(
    "name, hostname",
    [("gpu box.1", "node7.example.com"), ("ü*>", "h"), ("x" * 300, "h"), ("...", "...")],
)
def test_derived_id_sanitises_anything(name: str, hostname: str) -> None:
    worker_id = derive_worker_id(name, hostname)
    assert protocol.validate_worker_id(worker_id) == worker_id
    assert worker_id == derive_worker_id(name, hostname)


def test_sanitising_does_not_make_different_names_collide() -> None:
    assert derive_worker_id("a.b", "h") != derive_worker_id("a-b", "h")
    assert derive_worker_id("x" * 200 + "1", "h") != derive_worker_id("x" * 200 + "2", "h")


def test_agent_uses_the_given_id_else_derives_one() -> None:
    assert Agent("nats://x:4222", name="w", worker_id="fixed_id-1").worker_id == "fixed_id-1"
    derived = Agent("nats://x:4222", name="w")
    assert derived.worker_id == Agent("nats://x:4222", name="w").worker_id


def test_each_agent_draws_a_fresh_incarnation() -> None:
    assert (
        Agent("nats://x:4222", name="w").incarnation != Agent("nats://x:4222", name="w").incarnation
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"worker_id": "a.b"},
        {"worker_id": "a b"},
        {"worker_id": ""},
        {"worker_id": "x" * 129},
        {"capability": "quantum"},
        {"heartbeat_interval_s": 0},
        {"heartbeat_interval_s": -1},
        {"heartbeat_interval_s": float("nan")},
        {"max_concurrent_tasks": 0},
        {"tags": ["novalue"]},
        {"tags": ["=v"]},
        {"port": 70000},
        {"disk_path": "/no/such/path"},
        {"name": ""},
        {"unknown_option": 1},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AgentSettings(**{"name": "w", **bad})  # type: ignore[arg-type]


def test_strings_from_flags_and_environment_are_parsed() -> None:
    settings = AgentSettings.model_validate({
        "name": "w", "content_types": "audio, video,", "tags": "zone=eu-1,rack=7",
        "heartbeat_interval_s": "0.5", "max_concurrent_tasks": "4",
    })  # fmt: skip
    assert settings.content_types == ("audio", "video")
    assert settings.tags == {"zone": "eu-1", "rack": "7"}
    assert (settings.heartbeat_interval_s, settings.max_concurrent_tasks) == (0.5, 4)


def test_several_servers_may_be_given() -> None:
    settings = AgentSettings(name="w", nats_url="nats://a:4222, tls://b:4222,c:4222")
    assert settings.servers == ["nats://a:4222", "tls://b:4222", "c:4222"]


def test_capability_defaults_to_gpu_when_a_gpu_is_found(tmp_path: Path) -> None:
    settings = AgentSettings(name="w", disk_path=str(tmp_path))
    with_gpu = build_registration(settings, "w1", Prober(tmp_path, nvml=FakeNvml([FakeGpu()])))
    without = build_registration(settings, "w1", Prober(tmp_path, nvml=FakeNvml([])))
    assert with_gpu.capability is WorkerCapability.GPU
    assert with_gpu.supported_content_types == ["audio", "video", "image"]
    assert without.capability is WorkerCapability.CPU
    assert without.supported_content_types == ["document", "web", "text"]


def test_explicit_capability_and_content_types_win(tmp_path: Path) -> None:
    settings = AgentSettings(
        name="w",
        capability=WorkerCapability.HYBRID,
        content_types=("text",),
        tags={"a": "b"},
        port=9100,
    )
    reg = build_registration(settings, "w1", Prober(tmp_path, nvml=FakeNvml([FakeGpu()])))
    assert reg.capability is WorkerCapability.HYBRID
    assert reg.supported_content_types == ["text"]
    assert (reg.tags, reg.location.port, reg.worker_id, reg.name) == ({"a": "b"}, 9100, "w1", "w")
