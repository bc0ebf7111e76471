"""Prometheus metrics of a running registry, read from its state when scraped.

`registry_collector(registry)` is a Collector: the gauges and counters are read
from the Registry at scrape time (the projector and the sweeper keep plain
counters, so folding costs nothing more), and the two latency histograms are
the Registry's own `Latencies`, observed as writes and expiries are
acknowledged. `collector_registry(registry)` is a dedicated CollectorRegistry
holding it (never the global one: several registries in one process, as in
tests, would clash). `serve_metrics(...)` serves any CollectorRegistry on
`/metrics` with uvicorn on the registry's event loop (registry.asgiserve): a scrape never
reads state that another thread is changing. Collect on that loop too.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Final

import structlog
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from registry.asgiserve import listen, serving
from registry.protocol import WorkerCapability, WorkerInfo, WorkerStatus

if TYPE_CHECKING:
    from registry.server.app import Registry
    from registry.server.projector import KindCounts

log = structlog.get_logger("registry.metrics")

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
DETECTION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class MetricsError(Exception):
    """The metrics endpoint could not listen (a taken port, an unknown host)."""


class Latencies:
    """The two histograms observed as things happen; registered nowhere by themselves."""

    def __init__(self) -> None:
        self.event_to_bucket = Histogram(
            "registry_event_to_bucket_seconds",
            "From when JetStream stored the oldest event a bucket write carries to the "
            "write's acknowledgement",
            buckets=LATENCY_BUCKETS, registry=None,
        )  # fmt: skip
        self.detection = Histogram(
            "registry_expiry_detection_seconds",
            "From a silent worker's deadline (last heartbeat + timeout) to its expiry "
            "stored in the stream (grace and held expiries included)",
            buckets=DETECTION_BUCKETS, registry=None,
        )  # fmt: skip

    def collect(self) -> Iterator[Metric]:
        yield from self.event_to_bucket.collect()
        yield from self.detection.collect()


class RegistryCollector:
    """A prometheus_client Collector over one running Registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def describe(self) -> list[Metric]:
        """The same families (names clash-checked by a CollectorRegistry)."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        r = self.registry
        yield from fleet(r.records())
        yield from _events(r.projector.kinds)
        yield from _progress(r.counters())
        yield from r.latencies.collect()


def registry_collector(registry: Registry) -> Collector:
    return RegistryCollector(registry)


def collector_registry(registry: Registry) -> CollectorRegistry:
    """A CollectorRegistry of its own holding the registry's metrics; add yours to it."""
    target = CollectorRegistry()
    target.register(registry_collector(registry))
    return target


@contextlib.asynccontextmanager
async def registry_metrics(registry: Registry, host: str, port: int | None) -> AsyncIterator[None]:
    """`registry up --metrics-port`: the registry's metrics on /metrics for the block
    (nothing when `port` is None). The port served is `registry.metrics_port`."""
    if port is None:
        yield
        return
    async with serve_metrics(collector_registry(registry), host, port) as served:
        registry.metrics_port = served
        log.info("metrics_serving", url=f"http://{_url_host(host)}:{served}/metrics")
        try:
            yield
        finally:
            registry.metrics_port = None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def render(source: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition format of `source`, and its Content-Type."""
    return generate_latest(source), CONTENT_TYPE


# ---------------------------------------------------------------- families


def fleet(records: Mapping[str, WorkerInfo], prefix: str = "registry") -> Iterator[Metric]:
    """Workers by status and capability; available and late ones by capability (the
    gateway reports the bucket it follows under its own prefix)."""
    by_status: Counter[tuple[str, str]] = Counter()
    available: Counter[str] = Counter()
    late: Counter[str] = Counter()
    for rec in records.values():
        cap = rec.registration.capability
        by_status[rec.status, cap] += 1
        available[cap] += rec.available
        late[cap] += rec.late and rec.live
    workers = GaugeMetricFamily(
        f"{prefix}_workers", "Worker records by status and capability (offline ones until purged)",
        labels=["status", "capability"],
    )  # fmt: skip
    for status in WorkerStatus:
        for cap in WorkerCapability:
            workers.add_metric([status.value, cap.value], by_status[status, cap])
    yield workers
    yield _by_capability(f"{prefix}_workers_available", "Workers a router may pick", available)
    yield _by_capability(f"{prefix}_workers_late", "Live workers announced late", late)


def _by_capability(name: str, doc: str, counts: Counter[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["capability"])
    for cap in WorkerCapability:
        family.add_metric([cap.value], counts[cap])
    return family


def _events(kinds: KindCounts) -> Iterator[Metric]:
    """Events taken from the stream by outcome and kind (each counted once)."""
    for name, doc, counts in (
        ("registry_events_folded", "Events that changed a record", kinds.applied),
        ("registry_events_duplicate", "Events already folded (redelivered)", kinds.duplicate),
        ("registry_events_ignored",
         "Valid events with no effect (a stale incarnation, a premature verdict, ...)",
         kinds.ignored),
        ("registry_events_unregistered", "Events for a worker with no registration",
         kinds.unregistered),
    ):  # fmt: skip
        family = CounterMetricFamily(name, doc, labels=["kind"])
        for kind, n in counts.items():
            family.add_metric([kind], n)
        yield family
    rejected = CounterMetricFamily(
        "registry_events_rejected", "Events that did not decode or validate, by reason code",
        labels=["kind", "code"],
    )  # fmt: skip
    for (kind, code), n in sorted(kinds.rejected.items()):
        rejected.add_metric([kind, code], n)
    yield rejected


_COUNTERS: Final = (
    ("registry_bucket_writes", "bucket_writes", "Records written to the bucket"),
    ("registry_availability_published", "availability_published",
     "Availability changes published to routers"),
    ("registry_controls_sent", "controls_sent", "Control messages sent to agents"),
    ("registry_projector_resyncs", "resyncs", "Times the projector reloaded after a fault"),
    ("registry_expiries_published", "expiries_published", "Expiries the sweeper stored"),
    ("registry_lates_published", "lates_published", "Late notices the sweeper stored"),
    ("registry_expiries_released", "expiries_released",
     "Expiries let through at the brake's limited rate after a hold"),
    ("registry_terms", "terms", "Times this process became the active registry"),
)  # fmt: skip
_GAUGES: Final = (
    ("registry_projector_lag_events", "pending", "Events in the stream not yet folded"),
    ("registry_projector_lag_seconds", "lag_s",
     "Age of the last event folded when its batch was written (0 when caught up)"),
    ("registry_projector_sequence", "last_seq", "Stream sequence folded through"),
    ("registry_expiries_held", "expiries_held", "Expiries held by the mass-expiry brake"),
    ("registry_brake_engaged", "brake_engaged", "1 while the mass-expiry brake holds expiries"),
    ("registry_active", "active", "1 while this process holds the lease (active), 0 standby"),
    ("registry_lease_epoch", "lease_epoch", "Epoch of the lease held (0 while standing by)"),
)  # fmt: skip


def _progress(counters: Mapping[str, int | float]) -> Iterator[Metric]:
    for name, key, doc in _COUNTERS:
        yield CounterMetricFamily(name, doc, value=counters[key])
    for name, key, doc in _GAUGES:
        yield GaugeMetricFamily(name, doc, value=counters[key])


# ---------------------------------------------------------------- serving


@contextlib.asynccontextmanager
async def serve_metrics(source: CollectorRegistry, host: str, port: int) -> AsyncIterator[int]:
    """Serve `GET /metrics` from `source` on host:port (0: a free port) for the block;
    yields the port. Leaving the block stops listening and drops open connections."""
    try:
        sock = listen(host, port)
    except OSError as e:
        raise MetricsError(f"metrics: {e}") from None
    async with serving(_endpoint(source), sock, graceful_s=1) as served:
        yield served.port


def _endpoint(source: CollectorRegistry) -> ASGIApp:
    """`GET` or `HEAD /metrics`: the text format, read when asked; 404 or 405 otherwise."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status, body, headers = 200, b"", [(b"content-type", CONTENT_TYPE.encode())]
        if scope["path"] != "/metrics":
            status, body = 404, b"only /metrics here\n"
        elif scope["method"] not in ("GET", "HEAD"):
            status, headers = 405, [*headers, (b"allow", b"GET, HEAD")]
        else:
            try:
                body = render(source)[0]
            except Exception as e:  # noqa: BLE001 - a collector's bug is one failed scrape
                log.error("metrics_collect_failed", error=f"{type(e).__name__}: {e}")
                status = 500
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})  # fmt: skip

    return app
