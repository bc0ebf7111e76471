"""`agent` command line: bad input is one line on stderr and exit 2, before any NATS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from agent.cli import ProbeSettings, UsageError, main, parse
from agent.settings import AgentSettings
from registry.protocol import HardwareInfo, WorkerCapability, WorkerLocation, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = "nats://127.0.0.1:1"  # nothing must try it: errors come first


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--capability", "quantum"], "--capability"),
        (["--worker-id", "gpu.box"], "--worker-id"),
        (["--worker-id", "a" * 129], "--worker-id"),
        (["--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["--heartbeat-interval", "-2"], "--heartbeat-interval"),
        (["--heartbeat-interval", "soon"], "--heartbeat-interval"),
        (["--tag", "zone"], "--tag"),
        (["--max-tasks", "0"], "--max-tasks"),
        (["--port", "99999"], "--port"),
        (["--disk-path", "/no/such/dir"], "--disk-path"),
        (["--bogus"], "--bogus"),
        (["--nats", "http://h:4222"], "--nats"),
        (["--nats", "nats://h:99999"], "--nats"),
        (["--nats", "nats://:4222"], "--nats"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    args: list[str], flag: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENT_NAME", raising=False)
    code = main(["run", "--nats", UNREACHABLE, "--name", "w", *args])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("agent: error:")
    assert flag in err and "Traceback" not in err


def test_missing_name_names_the_flag_and_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENT_NAME", raising=False)
    assert main(["run", "--nats", UNREACHABLE]) == 2
    assert capsys.readouterr().err == "agent: error: --name is required (or set AGENT_NAME)\n"


def test_a_bad_environment_variable_is_refused_like_a_flag(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_CAPABILITY", "quantum")
    assert main(["run", "--nats", UNREACHABLE, "--name", "w"]) == 2
    assert "--capability 'quantum'" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help"]) == 0
    assert "--heartbeat-interval" in capsys.readouterr().out


def test_flags_become_settings() -> None:
    settings, level = parse(
        ["run", "--nats", "nats://h:4222", "--name", "gpu-box-1", "--capability", "hybrid",
         "--worker-id", "box_1", "--max-tasks", "3", "--content-types", "audio,text",
         "--tag", "zone=eu-1", "--tag", "rack=7", "--heartbeat-interval", "0.5",
         "--port", "9000", "--log-level", "debug"],
        {},
    )  # fmt: skip
    assert settings == AgentSettings(
        nats_url="nats://h:4222", name="gpu-box-1", capability=WorkerCapability.HYBRID,
        worker_id="box_1", max_concurrent_tasks=3, content_types=("audio", "text"),
        tags={"zone": "eu-1", "rack": "7"}, heartbeat_interval_s=0.5, port=9000,
    )  # fmt: skip
    assert level == "debug"


def test_every_flag_falls_back_to_the_environment() -> None:
    env = {
        "NATS_URL": "nats://env:4222", "AGENT_NAME": "env-box", "AGENT_CAPABILITY": "cpu",
        "AGENT_WORKER_ID": "env_id", "AGENT_MAX_TASKS": "2", "AGENT_CONTENT_TYPES": "web",
        "AGENT_TAGS": "a=1,b=2", "AGENT_HEARTBEAT_INTERVAL": "7", "AGENT_DISK_PATH": "/",
        "AGENT_PORT": "8100", "AGENT_LOG_LEVEL": "WARNING",
    }  # fmt: skip
    settings, level = parse(["run"], env)
    assert settings == AgentSettings(
        nats_url="nats://env:4222", name="env-box", capability=WorkerCapability.CPU,
        worker_id="env_id", max_concurrent_tasks=2, content_types=("web",),
        tags={"a": "1", "b": "2"}, heartbeat_interval_s=7.0, disk_path="/", port=8100,
    )  # fmt: skip
    assert level == "warning"


def test_flags_win_over_the_environment() -> None:
    settings, _ = parse(["run", "--name", "flag"], {"AGENT_NAME": "env"})
    assert isinstance(settings, AgentSettings) and settings.name == "flag"
    assert settings.capability is None  # decided by the probe: gpu if a GPU is found


def test_probe_takes_only_local_options() -> None:
    settings, _ = parse(["probe", "--port", "9001"], {"NATS_URL": "ignored"})
    assert settings == ProbeSettings(port=9001)
    with pytest.raises(UsageError):
        parse(["probe", "--nats", "nats://h:4222"], {})


def test_probe_prints_hardware_location_and_metrics_as_json() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": UNREACHABLE}
    done = subprocess.run(
        [sys.executable, "-m", "agent", "probe", "--port", "9000"],
        capture_output=True, env=env, cwd=ROOT, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"hardware", "location", "metrics"}
    msgspec.convert(report["hardware"], HardwareInfo)
    assert msgspec.convert(report["location"], WorkerLocation).port == 9000
    msgspec.convert(report["metrics"], WorkerMetrics)
    assert b"Traceback" not in done.stderr
