"""What a person configures about an agent, and who the worker is.

`AgentSettings` validates human input once (flags, environment, keyword
options); `derive_worker_id` gives a restarted worker the same id;
`build_registration` turns settings plus a probe into the wire's registration.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.probe import Prober
from registry import protocol
from registry.connect import Auth, split_servers
from registry.protocol import WorkerCapability

_UNSAFE_ID_CHARS: Final = re.compile(r"[^A-Za-z0-9_-]+")


def split_commas(value: object) -> object:
    """`"a, b,"` -> `("a", "b")`; anything else is left for pydantic to judge."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def parse_tags(value: object) -> object:
    """`{"k": "v"}`, or `k=v` strings (a list, or one comma-separated string)."""
    if isinstance(value, Mapping):
        return value
    items = split_commas(value)
    if not isinstance(items, Iterable):
        return value
    tags: dict[str, str] = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"tag {item!r} is not key=value")
        tags[key.strip()] = val.strip()
    return tags


def existing_path(value: str) -> str:
    if not Path(value).exists():
        raise ValueError(f"no such file or directory: {value}")
    return value


def describe(error: ValidationError, options: Mapping[str, tuple[str, str]]) -> str:
    """The first validation error as one line naming the flag (`options`: settings
    field -> (flag, environment variable))."""
    first = error.errors()[0]
    if not first["loc"]:  # a rule over several fields: its message names them
        return str(first["msg"]).removeprefix("Value error, ")
    field = str(first["loc"][0])
    flag, env = options.get(field, (field, ""))
    if first["type"] == "missing":
        return f"{flag} is required (or set {env})"
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid {flag} {first.get('input')!r}: {message}"


class ConnectionFields(BaseModel):
    """Where to connect (one URL, or several comma-separated) and the credentials,
    nkey and TLS files (`registry.connect.Auth`), checked at once."""

    nats_url: str = Field(default="nats://127.0.0.1:4222", min_length=1)
    creds: str | None = None
    nkey: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @field_validator("nats_url")
    @classmethod
    def _nats_urls(cls, value: str) -> str:
        split_servers(value)  # NatsUrlError (a ValueError) names the bad one
        return value

    @model_validator(mode="after")
    def _auth_files(self) -> Self:
        self.auth  # noqa: B018 - AuthError (a ValueError) says which file and why
        return self

    @property
    def auth(self) -> Auth:
        return Auth(self.creds, self.nkey, self.tls_ca, self.tls_cert, self.tls_key)


class AgentSettings(ConnectionFields):
    """Everything a person configures about an agent, validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    capability: WorkerCapability | None = None  # None: gpu when a GPU is found, else cpu
    worker_id: str | None = None  # None: derived from name and hostname
    max_concurrent_tasks: int = Field(default=1, ge=1, le=protocol.MAX_SLOTS)
    content_types: tuple[str, ...] = ()  # empty: the capability's defaults
    tags: dict[str, str] = {}
    heartbeat_interval_s: float = Field(default=5.0, gt=0.0, le=protocol.MAX_HEARTBEAT_INTERVAL_S)
    disk_path: str = "."
    port: int = Field(default=8000, ge=0, le=65535)
    publish_timeout_s: float = Field(default=2.0, gt=0.0)
    unregister_timeout_s: float = Field(default=2.0, gt=0.0)
    reconnect_wait_s: float = Field(default=2.0, gt=0.0)
    reconnect_jitter_s: float = Field(default=1.0, ge=0.0)

    @field_validator("disk_path")
    @classmethod
    def _existing_path(cls, value: str) -> str:
        return existing_path(value)

    @field_validator("worker_id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return protocol.validate_worker_id(value)
        except protocol.InvalidWorkerId:
            raise ValueError(
                "use 1-128 characters from A-Z a-z 0-9 _ - (one NATS subject token)"
            ) from None

    @model_validator(mode="after")
    def _id_of_the_credentials(self) -> Self:
        """Agent credentials speak for one worker id: another would be refused by the server."""
        auth = self.auth
        if auth.role == "agent" and self.worker_id not in (None, auth.identity):
            raise ValueError(
                f"the credentials speak for worker {auth.identity!r}, not {self.worker_id!r}: "
                "omit the worker id or mint credentials for it"
            )
        return self

    @property
    def own_worker_id(self) -> str | None:
        """The worker id given, else the one agent credentials speak for (None: derive one)."""
        auth = self.auth
        return self.worker_id or (auth.identity if auth.role == "agent" else None)

    @field_validator("content_types", mode="before")
    @classmethod
    def _content_types(cls, value: object) -> object:
        return split_commas(value)

    @field_validator("content_types")
    @classmethod
    def _content_type_length(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(len(t) > 128 for t in value):
            raise ValueError("a content type is longer than 128 characters")
        return value

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: object) -> object:
        return parse_tags(value)

    @field_validator("tags")
    @classmethod
    def _tag_lengths(cls, value: dict[str, str]) -> dict[str, str]:
        if any(len(k) > 128 or len(v) > 1024 for k, v in value.items()):
            raise ValueError("tag keys are at most 128 characters, values 1024")
        return value

    @property
    def servers(self) -> list[str]:
        return split_servers(self.nats_url)


def derive_worker_id(name: str, hostname: str) -> str:
    """A stable id from name and hostname, so a restarted worker keeps its id.

    Characters outside [A-Za-z0-9_-] become '-'; when that (or truncation to
    128) changed anything, a short hash of the original is appended so that
    e.g. `a.b` and `a-b` do not collide.
    """
    raw = f"{name}-{hostname}"
    safe = _UNSAFE_ID_CHARS.sub("-", raw).strip("-") or "worker"
    if safe == raw and len(safe) <= 128:
        return safe
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{safe[:119]}-{digest}"


def build_registration(
    settings: AgentSettings, worker_id: str, prober: Prober
) -> protocol.WorkerRegistration:
    """Probe the machine (blocking) and fill in the capability's defaults."""
    hardware = prober.hardware()
    capability = settings.capability or (
        WorkerCapability.GPU if hardware.gpu_count else WorkerCapability.CPU
    )
    content_types = settings.content_types or protocol.DEFAULT_CONTENT_TYPES[capability]
    return protocol.WorkerRegistration(
        worker_id=worker_id,
        name=settings.name,
        capability=capability,
        hardware=hardware,
        location=prober.location(settings.port),
        max_concurrent_tasks=settings.max_concurrent_tasks,
        supported_content_types=list(content_types),
        tags=dict(settings.tags),
    )
