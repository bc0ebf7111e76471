"""The gateway's Prometheus metrics: HTTP requests by route and code, and the fleet it sees.

Requests are counted by a plain ASGI middleware (route templates, not paths:
`/api/v1/workers/{worker_id}`, so a fleet does not become a label per worker);
the fleet's gauges are read from the followed bucket at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.protocol import WorkerCapability, WorkerStatus

if TYPE_CHECKING:
    from registry.http.gateway import Gateway

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class FleetCollector(Collector):
    """Workers by status and capability, and available ones, as the gateway sees them."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by = GaugeMetricFamily("registry_gateway_workers", "Workers in the bucket as this "
                               "gateway follows it, by status and capability",
                               labels=["status", "capability"])  # fmt: skip
        counts = {(s, c): 0 for s in WorkerStatus for c in WorkerCapability}
        available = 0
        for r in self.gateway.view.records().values():
            counts[(r.status, r.registration.capability)] += 1
            available += r.available
        for (s, c), n in counts.items():
            by.add_metric([s.value, c.value], n)
        yield by
        yield GaugeMetricFamily("registry_gateway_available_workers",
                                "Workers available for new work", value=available)  # fmt: skip


class HttpMetrics:
    def __init__(self, gateway: Gateway) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "registry_http_requests", "HTTP requests answered, by method, route and status code",
            ["method", "route", "code"], registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            "registry_http_request_duration_seconds", "Time to answer an HTTP request",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(FleetCollector(gateway))
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:  # labels() costs more than the count: once per combination
            children = (self.requests.labels(method, route, str(status)),
                        self.duration.labels(method, route))  # fmt: skip
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class CountRequests:
    """ASGI middleware: each answer counted and timed by method, route template and code."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.observe(scope["method"], route, message["status"],
                                     time.perf_counter() - started)  # fmt: skip
            await send(message)

        await self.app(scope, receive, sending)
