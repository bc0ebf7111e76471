"""What a person configures about a simulated fleet (pydantic: human input)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from agent.settings import ConnectionFields
from registry.protocol import MAX_HEARTBEAT_INTERVAL_S


class SimSettings(ConnectionFields):
    """What a person configures about a simulated fleet, validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    count: int = Field(default=200, ge=1, le=1_000_000)
    heartbeat_interval_s: float = Field(default=5.0, gt=0.0, le=MAX_HEARTBEAT_INTERVAL_S)
    churn: float = Field(default=0.0, ge=0.0, le=60.0)  # fraction of the fleet per minute
    duration_s: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    id_prefix: str = Field(default="sim", pattern=r"^[A-Za-z0-9_-]{1,100}$")
    unregister: bool = True
    ramp_s: float = Field(default=0.0, ge=0.0)  # spread the registrations over this long
    kill: int = Field(default=0, ge=0)
    kill_after_s: float = Field(default=0.0, ge=0.0)
    kill_within_s: float = Field(default=10.0, ge=0.0)
    window: int = Field(default=4096, ge=1, le=1_000_000)
    tick_s: float = Field(default=0.01, gt=0.0, le=1.0)
    stop_timeout_s: float = Field(default=10.0, gt=0.0)
