"""`registry check`: 0 when connected, provisioned, caught up and answering; else the reason."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from nats.aio.client import Client

from registry.ops.check import Unhealthy, check
from registry.server.embedded import NatsServer
from registry.server.provision import provision
from tests.conftest import eventually
from tests.integration.registry_helpers import (
    Beater,
    bounded,
    new_incarnation,
    publish,
    register_body,
    running_registry,
)


@bounded(20)
async def test_healthy_registry_passes(nats_server: NatsServer) -> None:
    async with running_registry(nats_server.url, caught_up=True, instance="reg-a") as reg:
        report = await check(nats_server.url, max_lag=10)
        epoch = reg.counters()["lease_epoch"]
    assert report.startswith("ok") and f"active registry reg-a (epoch {epoch}, since" in report


async def test_unreachable_server_fails_with_the_reason() -> None:
    with pytest.raises(Unhealthy, match="cannot connect"):
        await check("nats://127.0.0.1:1", max_lag=10, timeout_s=0.5)


async def test_unprovisioned_server_fails(nats_server: NatsServer) -> None:
    with pytest.raises(Unhealthy, match="stream WORKER_EVENTS is not provisioned"):
        await check(nats_server.url, max_lag=10)


async def test_provisioned_but_no_registry_ever_ran_fails(nats_server: NatsServer, nc: Client) -> None:
    await provision(nc)
    with pytest.raises(Unhealthy, match="consumer registry-projector is missing"):
        await check(nats_server.url, max_lag=10)


@bounded(20)
async def test_stopped_registry_fails_as_not_answering(nats_server: NatsServer) -> None:
    async with running_registry(nats_server.url, caught_up=True):
        pass
    with pytest.raises(Unhealthy, match="no worker-registry service answering"):
        await check(nats_server.url, max_lag=10, timeout_s=0.5)


@bounded(20)
async def test_lag_beyond_the_bound_fails(nats_server: NatsServer, nc: Client) -> None:
    js = nc.jetstream()
    async with running_registry(nats_server.url, caught_up=True):
        pass
    for i in range(20):  # the registry is down: these wait for it
        await publish(js, "register", f"w{i}", register_body(f"w{i}", new_incarnation()))
    with pytest.raises(Unhealthy, match="20 events behind"):
        await check(nats_server.url, max_lag=5)


@bounded(30)
async def test_a_registry_holding_expiries_says_so_and_is_not_unhealthy(
    nats_server: NatsServer, nc: Client
) -> None:
    """A health check must not get a registry restarted for being right to hold."""
    js = nc.jetstream()
    steady = {f"s{i}": new_incarnation() for i in range(4)}
    silent = {f"q{i}": new_incarnation() for i in range(8)}
    settings = {"timeout_floor_s": 0.1, "brake_min_fleet": 10, "caught_up": True,
                "brake_hold_s": 60.0}  # fmt: skip
    async with running_registry(nats_server.url, **settings) as reg:  # type: ignore[arg-type]
        for wid, inc in {**steady, **silent}.items():
            await publish(js, "register", wid, register_body(wid, inc, heartbeat_interval_s=0.2))
        async with Beater(js, steady, interval_s=0.1):
            await eventually(lambda: reg.counters()["expiries_held"] == 8, timeout=10)
            report = await check(nats_server.url, max_lag=100)
            assert report.startswith("holding expiries: 8 expiries held since")
            assert "otherwise ok: provisioned" in report
            cli = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "registry.cli", "check", "--nats",
                                 nats_server.url], capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert cli.returncode == 0 and cli.stdout.startswith("holding expiries:")


def test_cli_exit_codes_and_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "registry.cli", "check", "--nats", "nats://127.0.0.1:1",
         "--timeout", "0.5"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("registry check: cannot connect")
