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
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.server.metrics import LATENCY_BUCKETS, fleet

if TYPE_CHECKING:
    from registry.http.gateway import Gateway

class FleetCollector(Collector):
    """The bucket as the gateway follows it: `registry_gateway_workers{status,capability}`,
    `..._workers_available` and `..._workers_late` by capability (as the registry's own)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        return fleet(self.gateway.view.records(), prefix="registry_gateway")


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
