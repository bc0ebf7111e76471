"""The HTTP API's request and answer bodies: the original plan's, over the contract's types.

Requests are decoded with msgspec into these structs, whose fields are the
contract's own (registry.protocol): a body the gateway accepts is one the
registry folds, and the OpenAPI schema is generated from the same types.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import msgspec

from registry.protocol import (
    Interval,
    WorkerId,
    WorkerInfo,
    WorkerMetrics,
    WorkerRegistration,
    WorkerStatus,
)
from registry.query import Stats

Token = msgspec.Meta(max_length=8192)


class RegisterRequest(msgspec.Struct, kw_only=True):
    registration: WorkerRegistration
    auth_token: str | None = None
    heartbeat_interval_s: Interval | None = None  # ours: how often this worker will beat


class HeartbeatRequest(msgspec.Struct, kw_only=True):
    worker_id: WorkerId
    status: WorkerStatus
    metrics: WorkerMetrics
    timestamp: datetime | None = None


class Answer(msgspec.Struct, kw_only=True, omit_defaults=True):
    success: bool
    message: str
    worker_id: str | None = None


class HistoryEvent(msgspec.Struct, kw_only=True):
    seq: int
    kind: str
    stored_at: datetime
    summary: str


class History(msgspec.Struct, kw_only=True):
    worker_id: str
    events: list[HistoryEvent]


class Explanation(msgspec.Struct, kw_only=True):
    worker_id: str
    state: str
    lines: list[str]


class Health(msgspec.Struct, kw_only=True):
    status: str  # ok, degraded, unavailable
    reasons: list[str]
    active: dict[str, Any] | None
    lag_s: float | None
    pending: int | None
    brake_engaged: bool
    expiries_held: int
    workers: Stats


class Change(msgspec.Struct, kw_only=True):
    """One bucket change on the live feed; `record` None: the record was deleted."""

    worker_id: str
    record: WorkerInfo | None


REQUESTS = {"RegisterRequest": RegisterRequest, "HeartbeatRequest": HeartbeatRequest}
ANSWERS = {
    "Answer": Answer, "WorkerInfo": WorkerInfo, "Stats": Stats, "History": History,
    "Explanation": Explanation, "Health": Health,
}  # fmt: skip


def openapi_components() -> dict[str, Any]:
    """JSON Schemas of every body above, as OpenAPI `components/schemas`."""
    types = [*REQUESTS.values(), *ANSWERS.values()]
    _, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    return components


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def error_location(message: str) -> tuple[list[str | int], str]:
    """msgspec's "Expected `int`, got `str` - at `$.a.b[0]`" -> (["a", "b", 0], the text)."""
    m = _PATH.search(message)
    if m is None:
        return [], message
    loc: list[str | int] = [
        int(index) if index else name for name, index in _PART.findall(m.group("path"))
    ]
    return loc, message[: m.start()]
