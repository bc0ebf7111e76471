"""Prometheus metrics of a running registry, read from its state when scraped.

`registry_collector(registry)` is a Collector: the gauges and counters are read
from the Registry at scrape time (the projector and the sweeper keep plain
counters, so folding costs nothing more), and the two latency histograms are
the Registry's own `Latencies`, observed as writes and expiries are
acknowledged. `collector_registry(registry)` is a dedicated CollectorRegistry
holding it (never the global one: several registries in one process, as in
tests, would clash). `serve_metrics(...)` serves any CollectorRegistry on
`/metrics` with plain asyncio, on the registry's event loop: a scrape never
reads state that another thread is changing. Collect on that loop too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Final

import structlog
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from registry.protocol import WorkerCapability, WorkerInfo, WorkerStatus

if TYPE_CHECKING:
    from registry.server.app import Registry
    from registry.server.projector import KindCounts

log = structlog.get_logger("registry.metrics")

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
READ_TIMEOUT_S: Final = 5.0  # a scraper that sends no request in time is dropped
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
        yield from _fleet(r.records())
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


def _fleet(records: Mapping[str, WorkerInfo]) -> Iterator[Metric]:
    """Workers by status and capability; available and late ones by capability."""
    by_status: Counter[tuple[str, str]] = Counter()
    available: Counter[str] = Counter()
    late: Counter[str] = Counter()
    for rec in records.values():
        cap = rec.registration.capability
        by_status[rec.status, cap] += 1
        available[cap] += rec.available
        late[cap] += rec.late and rec.live
    workers = GaugeMetricFamily(
        "registry_workers", "Worker records by status and capability (offline ones until purged)",
        labels=["status", "capability"],
    )  # fmt: skip
    for status in WorkerStatus:
        for cap in WorkerCapability:
            workers.add_metric([status.value, cap.value], by_status[status, cap])
    yield workers
    yield _by_capability("registry_workers_available", "Workers a router may pick", available)
    yield _by_capability("registry_workers_late", "Live workers announced late", late)


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
    endpoint = _Endpoint(source)
    try:
        server = await asyncio.start_server(endpoint.answer, host, port)
    except OSError as e:
        raise MetricsError(f"metrics on {host}:{port}: {e.strerror or e}") from None
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await endpoint.close()


class _Endpoint:
    """One request per connection (`Connection: close`); nothing to keep alive."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source
        self.answering: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def close(self) -> None:
        """Cut open connections: their handlers end at once (not cancelled: Python 3.11's
        streams log a cancelled handler as an error)."""
        for writer in self.answering.values():
            writer.transport.abort()
        if self.answering:
            await asyncio.wait(set(self.answering), timeout=2.0)

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.answering[task] = writer
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._response(head))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the scraper went away, was cut off, or sent nonsense: nothing to answer
        finally:
            del self.answering[task]
            writer.close()

    def _response(self, head: bytes) -> bytes:
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path != "/metrics":
            return _http(404, "Not Found", b"only /metrics here\n", "text/plain; charset=utf-8")
        if method not in ("GET", "HEAD"):
            return _http(405, "Method Not Allowed", b"", "text/plain", "Allow: GET, HEAD\r\n")
        try:
            body, content_type = render(self.source)
        except Exception as e:  # noqa: BLE001 - a collector's bug is one failed scrape
            log.error("metrics_collect_failed", error=f"{type(e).__name__}: {e}")
            return _http(500, "Internal Server Error", b"", "text/plain")
        return _http(200, "OK", body, content_type, head_only=method == "HEAD")


def _http(
    code: int, reason: str, body: bytes, content_type: str, extra: str = "",
    head_only: bool = False,
) -> bytes:  # fmt: skip
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)
