"""Validated, frozen settings for the registry process (human input: pydantic)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from registry.connect import Auth, split_servers
from registry.protocol import MIN_LATE_FACTOR, MIN_TIMEOUT_FACTOR


class RegistrySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)  # Auth

    nats_url: str | None = Field(
        default=None, description="existing server; None starts an embedded one"
    )
    port: int = Field(default=4222, ge=0, le=65535)
    data_dir: Path = Path("./data")
    server_config: Path | None = Field(
        default=None, description="the embedded server's configuration (None: the packaged one)"
    )
    timeout_floor_s: float = Field(default=1.0, gt=0, le=86400)
    timeout_factor: float = Field(
        default=3.0, ge=MIN_TIMEOUT_FACTOR, le=100.0,
        description="the fold refuses expiries that claim less (protocol.MIN_TIMEOUT_FACTOR)",
    )  # fmt: skip
    outage_grace_s: float = Field(
        default=10.0, ge=0.0, le=3600.0,
        description="after an outage (no stream answer, a reconnect), nobody is judged "
        "for max(this, their timeout) from when the registry reads the stream again",
    )  # fmt: skip
    late_factor: float = Field(default=1.5, ge=0.0, le=100.0, description="0 disables")
    brake_fraction: float = Field(default=0.5, gt=0.0, le=1.0, description="1 disables")
    brake_min_fleet: int = Field(default=10, ge=1)
    brake_window_s: float = Field(default=30.0, gt=0)
    brake_hold_timeouts: float = Field(
        default=3.0, ge=0.0, le=1000.0,
        description="the brake holds expiries this many timeouts (of the longest among "
        "the held workers), then releases them at brake_release_per_s",
    )  # fmt: skip
    brake_hold_s: float | None = Field(
        default=None, ge=0.0, le=86400.0, description="a hold of this many seconds instead"
    )
    brake_release_per_s: float | None = Field(
        default=None, gt=0.0, le=1e6,
        description="expiries per second after the hold (None: 1% of the fleet, at least 1)",
    )  # fmt: skip
    retention_s: float = Field(
        default=86400.0, gt=0, description="offline records are purged this long after going offline"
    )
    purge_every_s: float = Field(
        default=1.0, gt=0, le=3600.0,
        description="a purge pass at most this often, while events flow or not",
    )  # fmt: skip
    purge_batch: int = Field(
        default=1000, ge=1, le=20000,
        description="records purged per pass at most (a full pass is followed by another "
        "after the next batch of events)",
    )  # fmt: skip
    purge_marker_ttl_s: int = Field(
        default=3600, ge=1, le=30 * 86400,
        description="how long a purged worker's bucket marker and `purged` availability "
        "message stay (Nats-TTL) before the server removes them",
    )  # fmt: skip
    batch_size: int = Field(default=4096, ge=1, le=20000)
    replicas: int = Field(default=1, ge=1, le=5)
    control_max_age_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    service: bool = True
    instance: str | None = Field(
        default=None, max_length=200, description="this process among registries (None: host-pid)"
    )
    lease_ttl_s: int = Field(default=3, ge=1, le=60, description="active/standby lease, seconds")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="serve Prometheus metrics on http://metrics_host:port/metrics (0: a free "
        "port; None: off)",
    )  # fmt: skip
    metrics_host: str = Field(default="127.0.0.1", min_length=1, max_length=255)
    auth: Auth = Field(default_factory=Auth, description="credentials and TLS files")

    @field_validator("nats_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        if v is not None:
            split_servers(v)  # NatsUrlError (a ValueError) names the bad one
        return v

    @field_validator("late_factor")
    @classmethod
    def _late(cls, v: float) -> float:
        if 0 < v < MIN_LATE_FACTOR:  # the fold would refuse every late notice it claims
            raise ValueError(f"late_factor must be 0 (off) or at least {MIN_LATE_FACTOR}")
        return v
