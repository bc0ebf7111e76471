"""`registry check`: connected, provisioned, caught up, answering — or why not."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.client import Client

from registry.connect import FAIL_FAST, Auth, NatsOptions, connect
from registry.protocol import LEASE_DECODER, LEASE_KEY, SERVICE_NAME
from registry.server.brake import SUBJECT as BRAKE_SUBJECT
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
        healthy = (
            f"provisioned, projector caught up ({lag} events behind), service answering; "
            f"active registry {active}"
        )
        brake = await brake_state(nc, timeout_s)
        if brake is not None and brake.get("engaged"):
            return f"holding expiries: {holding(brake)}; otherwise ok: {healthy}"
        return f"ok: {healthy}"
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
        json.loads(reply.data)
    except Exception as e:  # noqa: BLE001 - no responders, timeout, garbage: not answering
        raise Unhealthy(f"no {SERVICE_NAME} service answering ({type(e).__name__})") from None


async def brake_state(nc: Client, timeout_s: float, body: bytes = b"{}") -> dict[str, Any] | None:
    """The active registry's brake (`registry.brake`), or None when nobody answered."""
    try:
        reply = await nc.request(BRAKE_SUBJECT, body, timeout=timeout_s)
        answer: dict[str, Any] = json.loads(reply.data)
    except Exception:  # noqa: BLE001 - no responders, timeout, garbage: no answer
        return None
    return answer


def holding(brake: dict[str, Any]) -> str:
    """`12 expiries held since 14:05:09 (hold 9s, then 1/s; 3 released so far)`."""
    since = brake.get("held_since")
    when = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds") if since else "?"
    phase = ("releasing at" if brake.get("phase") == "releasing"
             else f"hold {brake.get('hold_s') or 0:.0f}s, then")  # fmt: skip
    return (f"{brake.get('held', '?')} expiries held since {when} ({phase} "
            f"{brake.get('release_per_s') or 0:g}/s; {brake.get('expiries_released', 0)} "
            "released so far): much of the fleet went silent at once; check the network "
            "and the agents, or `registry brake release` if they are gone")  # fmt: skip
