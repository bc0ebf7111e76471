"""Records, availability and events for tests (shared by unit and integration tests)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext

from registry import protocol
from registry.catalog import Catalog
from registry.fold import availability, is_available
from registry.protocol import (
    Availability,
    ExpiredEvent,
    HardwareInfo,
    HeartbeatEvent,
    OfflineReason,
    RegisterEvent,
    UnregisterEvent,
    WorkerCapability,
    WorkerInfo,
    WorkerLocation,
    WorkerMetrics,
    WorkerRegistration,
    WorkerStatus,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def make_info(
    worker_id: str = "w1",
    *,
    capability: str = "gpu",
    status: str = "online",
    active: int = 0,
    max_tasks: int = 2,
    content_types: list[str] | None = None,
    tags: dict[str, str] | None = None,
    offline_reason: str | None = None,
    last_heartbeat: datetime = T0,
    event_seq: int = 1,
    name: str | None = None,
) -> WorkerInfo:
    """A bucket record as the projector would write it (shared by the tests of issue 4)."""
    reason = OfflineReason(offline_reason) if offline_reason else None
    st = WorkerStatus.OFFLINE if reason else WorkerStatus(status)
    reg = WorkerRegistration(
        worker_id=worker_id, name=name or f"{worker_id}-name",
        capability=WorkerCapability(capability),
        hardware=HardwareInfo(cpu_cores=8, memory_gb=32.0, gpu_count=int(capability != "cpu")),
        location=WorkerLocation(hostname=f"{worker_id}.local", ip_address="10.0.0.1"),
        max_concurrent_tasks=max_tasks, supported_content_types=content_types or [],
        tags=tags or {},
    )  # fmt: skip
    metrics = WorkerMetrics(cpu_usage_percent=12.5, memory_usage_percent=40.0, active_tasks=active)
    return WorkerInfo(
        registration=reg, status=st, metrics=metrics, last_heartbeat=last_heartbeat,
        registered_at=T0 - timedelta(hours=1),
        available=is_available(st, reason is None, active, max_tasks),
        event_seq=event_seq, incarnation="inc-1", offline_reason=reason, heartbeat_interval_s=5.0,
        offline_at=last_heartbeat + timedelta(seconds=15) if reason else None,
    )  # fmt: skip


def make_avail(worker_id: str = "w1", **kw: object) -> Availability:
    return availability(make_info(worker_id, **kw))  # type: ignore[arg-type]


FLEET = [
    make_info("g1", capability="gpu", content_types=["video", "audio"], tags={"zone": "eu"}),
    make_info("g2", capability="gpu", status="busy", active=1),
    make_info("c1", capability="cpu", content_types=["text"], tags={"zone": "us"}),
    make_info("h1", capability="hybrid", active=2, max_tasks=2),
    make_info("x1", capability="gpu", offline_reason="expired"),
    make_info("x2", capability="cpu", offline_reason="unregistered"),
]


@dataclass
class View:
    """What the registry hands the service: records and projector counters."""

    by_id: dict[str, WorkerInfo]
    counts: dict[str, int | float] = field(
        default_factory=lambda: {"events_applied": 42, "events_rejected": 3, "pending": 0}
    )
    _catalog: Catalog | None = None

    def records(self) -> Mapping[str, WorkerInfo]:
        return self.by_id

    def catalog(self) -> Catalog:
        """The records indexed, built on first use (change `by_id` before asking)."""
        if self._catalog is None:
            self._catalog = Catalog(self.by_id.values())
        return self._catalog

    def counters(self) -> Mapping[str, int | float]:
        return self.counts


def register(
    worker_id: str, incarnation: str = "inc-1", heartbeat_interval_s: float = 5.0, **kw: Any
) -> RegisterEvent:
    reg = make_info(worker_id, **kw).registration
    return RegisterEvent(
        worker_id=worker_id, incarnation=incarnation, sent_at=T0, registration=reg,
        heartbeat_interval_s=heartbeat_interval_s,
    )  # fmt: skip


def heartbeat(
    worker_id: str, status: str = "online", active: int = 0, incarnation: str = "inc-1"
) -> HeartbeatEvent:
    metrics = WorkerMetrics(cpu_usage_percent=10.0, memory_usage_percent=20.0, active_tasks=active)
    return HeartbeatEvent(
        worker_id=worker_id, incarnation=incarnation, sent_at=T0, status=WorkerStatus(status),
        metrics=metrics,
    )  # fmt: skip


def unregister(
    worker_id: str, reason: str = "shutdown", incarnation: str = "inc-1"
) -> UnregisterEvent:
    return UnregisterEvent(worker_id=worker_id, incarnation=incarnation, sent_at=T0, reason=reason)


def expired(worker_id: str, last: Any, timeout_s: float = 15.0) -> ExpiredEvent:
    return ExpiredEvent(
        worker_id=worker_id, last_heartbeat=last, timeout_s=timeout_s,
        detected_at=last + timedelta(seconds=timeout_s),
    )  # fmt: skip


async def publish_events(js: JetStreamContext, *events: protocol.Event) -> list[int]:
    acks = []
    for e in events:
        subject = protocol.event_subject(protocol.EVENT_KIND[type(e)], e.worker_id)
        acks.append((await js.publish(subject, protocol.encode(e))).seq)
    return acks
