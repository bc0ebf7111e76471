"""`registry check`: connected, provisioned, caught up, answering — or why not."""

from __future__ import annotations

import base64
import json

import msgspec
from nats.aio.client import Client

from registry.connect import FAIL_FAST, Auth, NatsOptions, connect
from registry.protocol import LEASE_DECODER, LEASE_KEY, SERVICE_NAME
from registry.server.provision import DEFAULT_NAMES, Names, api, config_diff, stream_configs


class Unhealthy(Exception):
    """One line saying what is wrong."""


async def check(
    url: str, max_lag: int, timeout_s: float = 2.0, names: Names = DEFAULT_NAMES,
    auth: Auth | None = None,
) -> str:  # fmt: skip
    """A one-line report of a healthy registry, or Unhealthy with the reason."""
    try:
        options = NatsOptions.of(
            url, "registry-check", connect_timeout_s=timeout_s, reconnect=FAIL_FAST,
            auth=auth or Auth(),
        )  # fmt: skip
        nc = await connect(options, error_cb=_quiet)
    except Exception as e:  # noqa: BLE001 - any failure to connect is the answer
        raise Unhealthy(f"cannot connect to {url}: {str(e) or type(e).__name__}") from None
    try:
        await _provisioned(nc, names)
        lag = await _lag(nc, names)
        if lag > max_lag:
            raise Unhealthy(f"projector is {lag} events behind (bound {max_lag})")
        await _answering(nc, timeout_s)
        active = await _active(nc, names)
        return (
            f"ok: provisioned, projector caught up ({lag} events behind), service answering; "
            f"active registry {active}"
        )
    finally:
        await nc.close()


async def _quiet(e: Exception) -> None:
    pass


async def _provisioned(nc: Client, names: Names) -> None:
    for cfg in stream_configs(names):
        info = await api(nc, f"STREAM.INFO.{cfg['name']}")
        if "error" in info:
            raise Unhealthy(f"stream {cfg['name']} is not provisioned")
        diff = config_diff(cfg, info["config"], skip=frozenset({"num_replicas"}))  # 1 or 3: yours
        if diff:
            raise Unhealthy(f"stream {cfg['name']} differs from its definition: {diff[0]}")


async def _active(nc: Client, names: Names) -> str:
    """Who holds the active/standby lease: `holder (epoch N, since T)`."""
    subject = f"$KV.{names.lease_bucket}.{LEASE_KEY}"
    answer = await api(nc, f"STREAM.MSG.GET.{names.lease_stream}", {"last_by_subj": subject})
    message = answer.get("message") or {}
    headers = base64.b64decode(message.get("hdrs") or b"")
    if "error" in answer or b"KV-Operation: DEL" in headers or b"KV-Operation: PURGE" in headers:
        raise Unhealthy("no registry holds the lease (none running, or a takeover under way)")
    try:
        lease = LEASE_DECODER.decode(base64.b64decode(message.get("data") or b""))
    except msgspec.DecodeError:
        raise Unhealthy("the lease key holds something that is not a lease") from None
    epoch = lease.epoch or int(message.get("seq", 0))
    return f"{lease.holder} (epoch {epoch}, since {lease.since.isoformat(timespec='seconds')})"


async def _lag(nc: Client, names: Names) -> int:
    info = await api(nc, f"CONSUMER.INFO.{names.events}.{names.consumer}")
    if "error" in info:
        raise Unhealthy(f"projector consumer {names.consumer} is missing (registry never ran?)")
    return int(info["num_pending"]) + int(info["num_ack_pending"])


async def _answering(nc: Client, timeout_s: float) -> None:
    try:
        reply = await nc.request("registry.stats", b"{}", timeout=timeout_s)
        stats = json.loads(reply.data)
    except Exception as e:  # noqa: BLE001 - no responders, timeout, garbage: not answering
        raise Unhealthy(f"no {SERVICE_NAME} service answering ({type(e).__name__})") from None
    if stats.get("brake_engaged"):
        raise Unhealthy(
            f"mass-expiry brake engaged: {stats.get('expiries_held', '?')} expiries held "
            "(more than half the fleet went silent at once; check the network and agents)"
        )
