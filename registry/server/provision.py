"""Streams, bucket and consumer from the packaged JSON files under nats/ (one definition).

The files are what `nats stream add --config FILE` takes; we send them to the
JetStream API as they are, so the CLI and the registry cannot drift apart.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import msgspec
import structlog
from nats.aio.client import Client

from registry import protocol
from registry.definitions import load as load_definition

STREAM_FILES = (
    "streams/WORKER_EVENTS.json", "streams/WORKER_AVAILABILITY.json", "kv/workers.json",
    "kv/registry_lease.json",
)  # fmt: skip
CONSUMER_FILE = "consumers/registry-projector.json"
log = structlog.get_logger("registry.provision")
STREAM_EXISTS = 10058
API_TIMEOUT_S = 1.0  # short: a request lost in a restart or an election is asked again
MAX_PATIENCE_S = 10.0
_patience: ContextVar[float] = ContextVar("api_timeout_s", default=API_TIMEOUT_S)

# Fields a newer definition may turn on in a stream that an older version provisioned:
# the server takes them in place (STREAM.UPDATE), keeping every message. Per-message
# TTLs (purge markers that expire) can be enabled on an existing stream, never disabled.
UPGRADABLE: dict[str, object] = {"allow_msg_ttl": True}



@contextlib.contextmanager
def patience(timeout_s: float) -> Iterator[None]:
    """Patient JetStream API requests made within (by this task) wait up to `timeout_s`.

    A request that timed out is not undone: a consumer being created on a
    cluster that lost a node takes seconds to elect its leader, and asking
    again at once (delete, create) starts that over, for as long as the asker
    keeps its short timeout. Whoever retries waits longer each time."""
    token = _patience.set(timeout_s)
    try:
        yield
    finally:
        _patience.reset(token)


class ProvisionError(RuntimeError):
    """A definition conflicts with what the server holds; one line for people."""


@dataclass(frozen=True)
class Names:
    """Stream/bucket names; tests use unique ones, production the contract's."""

    events: str = protocol.EVENTS_STREAM
    availability: str = protocol.AVAILABILITY_STREAM
    bucket: str = protocol.BUCKET
    consumer: str = protocol.PROJECTOR_CONSUMER
    lease_bucket: str = protocol.LEASE_BUCKET

    @property
    def kv_stream(self) -> str:
        return f"KV_{self.bucket}"

    @property
    def lease_stream(self) -> str:
        return f"KV_{self.lease_bucket}"


DEFAULT_NAMES = Names()


def stream_configs(names: Names, replicas: int = 1) -> list[dict[str, Any]]:
    """The four stream definitions, renamed for `names` (a no-op by default)."""
    events, avail, kv, lease = (load_definition(f) for f in STREAM_FILES)
    events["name"] = names.events
    avail["name"] = names.availability
    kv["name"] = names.kv_stream
    kv["subjects"] = [f"$KV.{names.bucket}.>"]
    lease["name"] = names.lease_stream
    lease["subjects"] = [f"$KV.{names.lease_bucket}.>"]
    for cfg in (events, avail, kv, lease):
        cfg["num_replicas"] = replicas
    return [events, avail, kv, lease]


def consumer_config(names: Names, start_seq: int) -> dict[str, Any]:
    cfg = load_definition(CONSUMER_FILE)
    cfg["durable_name"] = names.consumer
    if start_seq > 1:
        cfg["deliver_policy"] = "by_start_sequence"
        cfg["opt_start_seq"] = start_seq
    return cfg


async def api(
    nc: Client, subject: str, body: dict[str, Any] | None = None, patient: bool = False
) -> dict[str, Any]:
    """One JetStream API request. A read is asked again soon if unanswered (one sent
    during an election is dropped, not queued); a `patient` one (creating or deleting the
    consumer, which asking again would start over) waits as long as `patience()` says."""
    payload = json.dumps(body).encode() if body is not None else b""
    timeout = _patience.get() if patient else API_TIMEOUT_S
    msg = await nc.request(f"$JS.API.{subject}", payload, timeout=timeout)
    result: dict[str, Any] = json.loads(msg.data)
    return result


def config_diff(
    wanted: dict[str, Any], actual: dict[str, Any], skip: frozenset[str] = frozenset()
) -> list[str]:
    skip = skip | {"description"}
    return [
        f"{k}: server has {actual.get(k)!r}, definition says {v!r}"
        for k, v in wanted.items()
        if k not in skip and actual.get(k) != v
    ]


def upgrades(wanted: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    """The fields of `wanted` that an existing stream lacks and may be given in place:
    what UPGRADABLE turns on, and subjects the contract added to the list (it grows,
    never renames)."""
    new = {
        k: v for k, v in UPGRADABLE.items()
        if wanted.get(k) == v and actual.get(k) != v
    }  # fmt: skip
    have = actual.get("subjects") or []
    if set(have) < set(wanted.get("subjects") or []):
        new["subjects"] = have + [s for s in wanted["subjects"] if s not in have]
    return new


async def ensure_stream(nc: Client, cfg: dict[str, Any]) -> bool:
    """Create the stream, or check that the existing one matches (turning on what
    `upgrades` allows in place: a deployment of an older version). True if created."""
    name = cfg["name"]
    info = await api(nc, f"STREAM.INFO.{name}")
    if "error" not in info:
        new = upgrades(cfg, info["config"])
        diff = config_diff(cfg, info["config"], skip=frozenset(new))
        if diff:
            raise ProvisionError(f"stream {name} exists with a different config: " + "; ".join(diff))
        if new:
            await _upgrade(nc, name, {**info["config"], **new})
            log.info("stream_upgraded", stream=name, fields=sorted(new))
        return False
    resp = await api(nc, f"STREAM.CREATE.{name}", cfg)
    if "error" in resp:
        raise ProvisionError(f"cannot create stream {name}: {resp['error'].get('description')}")
    return True


async def _upgrade(nc: Client, name: str, config: dict[str, Any]) -> None:
    resp = await api(nc, f"STREAM.UPDATE.{name}", config, patient=True)
    if "error" in resp:
        raise ProvisionError(f"cannot update stream {name}: {resp['error'].get('description')}")


async def provision(nc: Client, names: Names = DEFAULT_NAMES, replicas: int = 1) -> bool:
    """Streams and buckets; harmless to repeat. True if the `workers` bucket was created now."""
    created = [await ensure_stream(nc, cfg) for cfg in stream_configs(names, replicas)]
    return created[2]


async def server_time(nc: Client, names: Names = DEFAULT_NAMES) -> datetime | None:
    """The server's clock, from the `ts` of a stream info response."""
    info = await api(nc, f"STREAM.INFO.{names.events}")
    if "ts" not in info:
        return None
    return msgspec.convert(info["ts"], datetime)


async def stream_origin(nc: Client, names: Names = DEFAULT_NAMES) -> tuple[datetime, int] | None:
    """When the event stream was created, and its last sequence (None: no answer)."""
    info = await api(nc, f"STREAM.INFO.{names.events}")
    if "created" not in info:
        return None
    return msgspec.convert(info["created"], datetime), int(info["state"]["last_seq"])


CONSUMER_NOT_FOUND = 10014


async def consumer_ack_floor(nc: Client, names: Names) -> int | None:
    """The projector checkpoint: its consumer's ack floor, or None without one.

    Only "no such consumer" means none: any other error (no leader during an
    election, say) raises, and the caller asks again, rather than folding the
    whole stream again from sequence 1."""
    info = await api(nc, f"CONSUMER.INFO.{names.events}.{names.consumer}")
    error = info.get("error")
    if error is not None and error.get("err_code") == CONSUMER_NOT_FOUND:
        return None
    if error is not None:
        raise ProvisionError(f"consumer {names.consumer}: {error.get('description')}")
    return int(info["ack_floor"]["stream_seq"])


async def reset_consumer(nc: Client, names: Names, start_seq: int) -> None:
    """(Re)create the projector's durable to deliver in order from start_seq.

    A durable with unacknowledged messages would redeliver them only after
    ack_wait and after newer ones; recreating it at the checkpoint gives
    in-order delivery at once. Redelivered events are skipped by event_seq.
    """
    await api(nc, f"CONSUMER.DELETE.{names.events}.{names.consumer}", patient=True)
    body = {"stream_name": names.events, "config": consumer_config(names, start_seq)}
    resp = await api(nc, f"CONSUMER.CREATE.{names.events}.{names.consumer}", body, patient=True)
    if "error" in resp:
        raise ProvisionError(f"cannot create consumer {names.consumer}: {resp['error']}")
