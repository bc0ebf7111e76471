"""The wire contract: every body on a subject or in the bucket, and their names.

stdlib + msgspec only. Agents and routers import this module and nothing else
from the registry. Evolve only by adding fields with defaults; never rename,
never change a type, never forbid unknown fields (old agents and new
registries coexist during a rolling upgrade).
"""

from __future__ import annotations

import enum
import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import Annotated, Final

import msgspec
from msgspec import Meta

SCHEMA_VERSION: Final = 1

EVENTS_STREAM: Final = "WORKER_EVENTS"
AVAILABILITY_STREAM: Final = "WORKER_AVAILABILITY"
BUCKET: Final = "workers"
PROJECTOR_CONSUMER: Final = "registry-projector"
SERVICE_NAME: Final = "worker-registry"
LEASE_BUCKET: Final = "registry_lease"
LEASE_KEY: Final = "active"

EVENT_KINDS: Final = (
    "register", "heartbeat", "unregister", "expired", "late", "cordon", "uncordon", "drain",
)  # fmt: skip
OPERATOR_KINDS: Final = ("cordon", "uncordon", "drain")
"""Operator actions: published by people (the operator role), folded like any event."""
MAX_EVENT_BYTES: Final = 64 * 1024

# Bounds on what an event may claim (anyone who can publish may claim anything).
MAX_SLOTS: Final = 4096
"""The most concurrent tasks a worker may declare (`max_concurrent_tasks`)."""
MAX_ACTIVE_TASKS: Final = 1_000_000
"""The most tasks a worker may report running at once (above its slots is `full`, not an error)."""
MAX_TASK_COUNT: Final = 10**12
"""The most tasks a worker may report done or failed (a thousand a second for 30 years)."""
MAX_HEARTBEAT_INTERVAL_S: Final = 3600.0
"""The longest heartbeat interval a worker may declare."""
MAX_CPU_CORES: Final = 65536
MAX_GPUS: Final = 1024
MAX_GIB: Final = 2.0**30
"""The largest size in GiB (1 EiB)."""
MAX_LIST: Final = 256
"""The most content types or tags in a registration."""

# What a verdict must claim (see fold.py): the least silence the registry ever judges.
MIN_TIMEOUT_FACTOR: Final = 2.0
"""An expiry claims at least this many of the worker's intervals (`timeout_factor` >= it)."""
MIN_LATE_FACTOR: Final = 1.25
"""A late notice claims at least this many of the worker's intervals (`late_factor` >= it, or 0)."""

_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")


class InvalidWorkerId(ValueError):
    """A worker id that is not a single NATS subject token."""


def validate_worker_id(worker_id: str) -> str:
    if not isinstance(worker_id, str) or not _ID_RE.fullmatch(worker_id):
        raise InvalidWorkerId(
            f"invalid worker id {worker_id!r}: use 1-128 characters from A-Z a-z 0-9 _ -"
        )
    return worker_id


def event_subject(kind: str, worker_id: str) -> str:
    return f"worker.{kind}.{validate_worker_id(worker_id)}"


def available_subject(worker_id: str) -> str:
    return f"worker.available.{validate_worker_id(worker_id)}"


def control_subject(worker_id: str) -> str:
    return f"worker.control.{validate_worker_id(worker_id)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_incarnation() -> str:
    return uuid.uuid4().hex


def new_msg_id() -> str:
    """A random 128-bit Nats-Msg-Id: not derived from the id or a counter."""
    return secrets.token_hex(16)


# ---------------------------------------------------------------- value types

Percent = Annotated[float, Meta(ge=0.0, le=100.0)]
Count = Annotated[int, Meta(ge=0, le=2**53)]
Cores = Annotated[int, Meta(ge=0, le=MAX_CPU_CORES)]
Gpus = Annotated[int, Meta(ge=0, le=MAX_GPUS)]
Slots = Annotated[int, Meta(ge=1, le=MAX_SLOTS)]
ActiveTasks = Annotated[int, Meta(ge=0, le=MAX_ACTIVE_TASKS)]
TaskCount = Annotated[int, Meta(ge=0, le=MAX_TASK_COUNT)]
Size = Annotated[float, Meta(ge=0.0, le=MAX_GIB)]
Seconds = Annotated[float, Meta(ge=0.0, le=1e9)]
Interval = Annotated[float, Meta(gt=0.0, le=MAX_HEARTBEAT_INTERVAL_S)]
Text = Annotated[str, Meta(max_length=1024)]
Name = Annotated[str, Meta(min_length=1, max_length=256)]
WorkerId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
ContentTypes = Annotated[list[Annotated[str, Meta(max_length=128)]], Meta(max_length=MAX_LIST)]
Seq = Annotated[int, Meta(ge=0)]


class WorkerCapability(enum.StrEnum):
    CPU = "cpu"
    GPU = "gpu"
    HYBRID = "hybrid"


class WorkerStatus(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    BUSY = "busy"
    ERROR = "error"
    MAINTENANCE = "maintenance"


class OfflineReason(enum.StrEnum):
    UNREGISTERED = "unregistered"
    EXPIRED = "expired"


ALL_CONTENT_TYPES: Final = ("audio", "video", "image", "document", "web", "text")
DEFAULT_CONTENT_TYPES: Final = {
    WorkerCapability.GPU: ("audio", "video", "image"),
    WorkerCapability.CPU: ("document", "web", "text"),
    WorkerCapability.HYBRID: ALL_CONTENT_TYPES,
}


class _Model(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Every wire type: immutable, keyword-only, and not tracked by the cyclic GC.

    Structs hold no reference cycles, so the collector need not walk them: with
    100,000 records in memory a full collection otherwise paused the projector
    for seconds.
    """


class GpuInfo(_Model, frozen=True, kw_only=True):
    """One GPU as the agent probed it (an addition to HardwareInfo)."""

    index: Gpus
    model: Text = ""
    memory_gb: Size = 0.0
    memory_used_gb: Size = 0.0
    utilization_percent: Percent = 0.0
    error: Text | None = None


class HardwareInfo(_Model, frozen=True, kw_only=True):
    cpu_cores: Cores
    memory_gb: Size
    gpu_count: Gpus = 0
    gpu_memory_gb: Size = 0.0
    gpu_models: Annotated[list[Text], Meta(max_length=MAX_GPUS)] = []
    disk_space_gb: Size = 0.0
    gpus: Annotated[list[GpuInfo], Meta(max_length=MAX_GPUS)] = []


class WorkerLocation(_Model, frozen=True, kw_only=True):
    hostname: Text
    ip_address: Text
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    is_remote: bool = True
    network_latency_ms: Seconds | None = None


class WorkerMetrics(_Model, frozen=True, kw_only=True):
    cpu_usage_percent: Percent
    memory_usage_percent: Percent
    gpu_usage_percent: Percent = 0.0
    active_tasks: ActiveTasks = 0
    completed_tasks: TaskCount = 0
    failed_tasks: TaskCount = 0
    avg_task_duration_seconds: Seconds = 0.0
    gpu_memory_used_gb: Size = 0.0


ZERO_METRICS: Final = WorkerMetrics(cpu_usage_percent=0.0, memory_usage_percent=0.0)


def _generated_id() -> str:
    return uuid.uuid4().hex


class WorkerRegistration(_Model, frozen=True, kw_only=True):
    worker_id: WorkerId = msgspec.field(default_factory=_generated_id)
    name: Name
    capability: WorkerCapability
    hardware: HardwareInfo
    location: WorkerLocation
    max_concurrent_tasks: Slots = 1
    supported_content_types: ContentTypes = []
    tags: Annotated[
        dict[Annotated[str, Meta(max_length=128)], Text], Meta(max_length=MAX_LIST)
    ] = {}


# ---------------------------------------------------------------- events


class RegisterEvent(_Model, frozen=True, kw_only=True):
    v: int = SCHEMA_VERSION
    worker_id: WorkerId
    incarnation: Name
    sent_at: datetime
    registration: WorkerRegistration
    heartbeat_interval_s: Interval


class HeartbeatEvent(_Model, frozen=True, kw_only=True):
    v: int = SCHEMA_VERSION
    worker_id: WorkerId
    incarnation: Name
    sent_at: datetime
    status: WorkerStatus
    metrics: WorkerMetrics


class UnregisterEvent(_Model, frozen=True, kw_only=True):
    v: int = SCHEMA_VERSION
    worker_id: WorkerId
    incarnation: Name
    sent_at: datetime
    reason: Text = ""


class ExpiredEvent(_Model, frozen=True, kw_only=True):
    v: int = SCHEMA_VERSION
    worker_id: WorkerId
    last_heartbeat: datetime
    timeout_s: Seconds
    detected_at: datetime


class LateEvent(_Model, frozen=True, kw_only=True):
    """The sweeper's notice that a worker missed its beat (1.5 intervals by default).

    Folded into `late: true` and `available: false` until the next heartbeat, so
    routers stop sending work to a worker before it is expired.
    """

    v: int = SCHEMA_VERSION
    worker_id: WorkerId
    last_heartbeat: datetime
    late_after_s: Seconds
    detected_at: datetime


class OperatorEvent(_Model, frozen=True, kw_only=True):
    """An operator's action on one worker (`registry cordon | uncordon | drain`).

    `by` is who did it as the publisher states it (in a secured deployment only the
    operator and admin roles may publish these subjects); `reason` is free text."""

    v: int = SCHEMA_VERSION
    worker_id: WorkerId
    by: Name
    reason: Text = ""
    sent_at: datetime


class CordonEvent(OperatorEvent, frozen=True, kw_only=True):
    """No new work for this worker; its running tasks go on. Survives restarts of the
    worker (a new incarnation registers cordoned) until `uncordon`."""


class UncordonEvent(OperatorEvent, frozen=True, kw_only=True):
    """Lift a cordon or a drain: the worker may take work again."""


class DrainEvent(OperatorEvent, frozen=True, kw_only=True):
    """Cordon, and tell the worker's agent to finish what it runs and leave."""


Event = (
    RegisterEvent | HeartbeatEvent | UnregisterEvent | ExpiredEvent | LateEvent
    | CordonEvent | UncordonEvent | DrainEvent
)  # fmt: skip

EVENT_TYPES: Final[dict[str, type[Event]]] = {
    "register": RegisterEvent,
    "heartbeat": HeartbeatEvent,
    "unregister": UnregisterEvent,
    "expired": ExpiredEvent,
    "late": LateEvent,
    "cordon": CordonEvent,
    "uncordon": UncordonEvent,
    "drain": DrainEvent,
}
EVENT_KIND: Final[dict[type[Event], str]] = {t: k for k, t in EVENT_TYPES.items()}

_DECODERS: Final = {
    kind: msgspec.json.Decoder(cls) for kind, cls in EVENT_TYPES.items()
}
_ENCODER: Final = msgspec.json.Encoder()


class BadEvent(ValueError):
    """An event that does not decode or validate: poison, never retried.

    `reason` is one of REJECT_REASONS, ours and stable (tests, logs and counters
    key on it); the message adds the detail, which may quote the decoder's words.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


REJECT_REASONS: Final = (
    "bad_subject",  # not worker.<kind>.<id>, or an invalid id token
    "too_large",  # over MAX_EVENT_BYTES
    "undecodable",  # not JSON, invalid UTF-8, nested too deeply
    "invalid",  # JSON that breaks the schema: a missing field, a wrong type, out of range
    "unsupported_version",  # a `v` this registry does not know
    "id_mismatch",  # the body's worker id is not the subject's
    "decoder_failed",  # not the event's fault: the decoder raised something unforeseen
)


def parse_subject(subject: str) -> tuple[str, str]:
    """`worker.<kind>.<id>` -> (kind, id), or BadEvent."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != "worker" or parts[1] not in EVENT_TYPES:
        raise BadEvent("bad_subject", f"not an event subject: {subject!r}")
    if not _ID_RE.fullmatch(parts[2]):
        raise BadEvent("bad_subject", f"invalid worker id in subject: {parts[2]!r}")
    return parts[1], parts[2]


def decode_event(subject: str, data: bytes) -> Event:
    """Decode and validate one event body against its subject."""
    kind, worker_id = parse_subject(subject)
    if len(data) > MAX_EVENT_BYTES:
        raise BadEvent("too_large", f"body of {len(data)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        event = _DECODERS[kind].decode(data)
    except msgspec.ValidationError as e:  # valid JSON, wrong shape (a DecodeError subclass)
        raise BadEvent("invalid", f"invalid {kind} body: {e}") from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
        # some msgspec versions raise UnicodeDecodeError for invalid UTF-8 inside a string
        raise BadEvent("undecodable", f"undecodable {kind} body: {e}") from None
    if event.v != SCHEMA_VERSION:
        raise BadEvent("unsupported_version", f"unsupported schema version v={event.v!r}")
    if event.worker_id != worker_id:
        raise BadEvent(
            "id_mismatch", f"body worker_id {event.worker_id!r} != subject id {worker_id!r}"
        )
    if isinstance(event, RegisterEvent) and event.registration.worker_id != worker_id:
        raise BadEvent(
            "id_mismatch",
            f"registration.worker_id {event.registration.worker_id!r} != subject id {worker_id!r}",
        )
    return event


def encode(obj: object) -> bytes:
    return _ENCODER.encode(obj)


# ---------------------------------------------------------------- the bucket record


class Cordon(_Model, frozen=True, kw_only=True):
    """Why a worker takes no new work: an operator cordoned or drained it."""

    by: Name
    reason: Text = ""
    at: datetime  # when JetStream stored the operator's event
    drain: bool = False
    incarnation: str = ""  # drain: the process told to finish and leave ("" if none was live)
    event_seq: Seq = 0  # the operator event's sequence in WORKER_EVENTS


class WorkerInfo(_Model, frozen=True, kw_only=True):
    """The value of key <worker_id> in bucket `workers`."""

    v: int = SCHEMA_VERSION
    registration: WorkerRegistration
    status: WorkerStatus = WorkerStatus.OFFLINE
    metrics: WorkerMetrics = ZERO_METRICS
    last_heartbeat: datetime
    registered_at: datetime
    available: bool = False
    event_seq: Seq = 0
    incarnation: str = ""
    offline_reason: OfflineReason | None = None
    version: Count = 1
    heartbeat_interval_s: Interval = 1.0
    last_heartbeat_seq: Seq = 0
    offline_at: datetime | None = None
    late: bool = False
    cordon: Cordon | None = None

    @property
    def worker_id(self) -> str:
        return self.registration.worker_id

    @property
    def live(self) -> bool:
        return self.offline_reason is None


WORKER_INFO_DECODER: Final = msgspec.json.Decoder(WorkerInfo)


# ---------------------------------------------------------------- availability and control


class Availability(_Model, frozen=True, kw_only=True):
    """Body of `worker.available.<id>`: what a router decides on."""

    v: int = SCHEMA_VERSION
    worker_id: WorkerId
    available: bool
    status: WorkerStatus
    capability: WorkerCapability
    supported_content_types: ContentTypes = []
    active_tasks: ActiveTasks = 0
    max_concurrent_tasks: Slots = 1
    reason: Text = ""
    changed_at: datetime
    event_seq: Seq = 0


AVAILABILITY_DECODER: Final = msgspec.json.Decoder(Availability)

PURGED: Final = "purged"
"""`reason` of a worker's last availability message once its offline record was purged
after the retention period (`available` false): routers forget the worker. The message
carries a TTL (`Nats-TTL`), so it too leaves WORKER_AVAILABILITY."""

class Control(_Model, frozen=True, kw_only=True):
    """Body of `worker.control.<id>` (core NATS).

    `register`: register again (the registry has no registration for this
    incarnation). `superseded`: another process registered this worker id; the
    process of `incarnation` must stop beating (it is no longer the worker)."""

    v: int = SCHEMA_VERSION
    action: str
    reason: str = ""
    incarnation: str = ""  # the process addressed; empty: whichever listens


CONTROL_DECODER: Final = msgspec.json.Decoder(Control)


# ---------------------------------------------------------------- the lease


class Lease(_Model, frozen=True, kw_only=True):
    """The value of key `active` in bucket `registry_lease`: which registry process
    projects and sweeps. Each message carries a TTL (`Nats-TTL`, `ttl_s`); the holder
    renews it by compare-and-set on the revision, and when it is not renewed the
    server removes it and a standby creates it again.

    `epoch` numbers the holder's term: the revision of the message that created the
    key. The creating message itself carries 0 (its revision is not known before it
    is stored); every renewal carries the number."""

    v: int = SCHEMA_VERSION
    holder: str
    epoch: int = 0
    since: datetime
    ttl_s: int
    host: str = ""
    pid: int = 0


LEASE_DECODER: Final = msgspec.json.Decoder(Lease)
