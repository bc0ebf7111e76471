"""`registry up --metrics-port/--metrics-host` and their environment variables."""

from __future__ import annotations

import pytest

from registry.cli import build_parser, settings_from
from registry.server.settings import RegistrySettings


def _settings(*argv: str) -> RegistrySettings:
    return settings_from(build_parser().parse_args(["up", *argv]))


def test_metrics_are_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGISTRY_METRICS_PORT", raising=False)
    monkeypatch.delenv("REGISTRY_METRICS_HOST", raising=False)
    s = _settings()
    assert s.metrics_port is None and s.metrics_host == "127.0.0.1"


def test_flags_set_port_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_METRICS_PORT", "9000")
    s = _settings("--metrics-port", "9464", "--metrics-host", "0.0.0.0")
    assert (s.metrics_port, s.metrics_host) == (9464, "0.0.0.0")


def test_environment_sets_port_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_METRICS_PORT", "9464")
    monkeypatch.setenv("REGISTRY_METRICS_HOST", "::1")
    s = _settings()
    assert (s.metrics_port, s.metrics_host) == (9464, "::1")


def test_a_port_out_of_range_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["up", "--metrics-port", "70000"])
    assert args.run(args) == 2
    assert "metrics_port" in capsys.readouterr().err
