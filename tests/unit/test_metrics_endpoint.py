"""The /metrics endpoint itself (`registry.server.metrics.serve_metrics`), over a
CollectorRegistry of the test's own: no NATS. Requests go through urllib."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from registry.server.metrics import MetricsError, serve_metrics
from tests.conftest import port_open


def _request(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()



@pytest.fixture
def source() -> CollectorRegistry:
    target = CollectorRegistry()
    Counter("things_done", "Things done", ["kind"], registry=target).labels(kind="a").inc(3)
    return target



async def test_get_metrics_answers_the_text_format(source: CollectorRegistry) -> None:
    async with serve_metrics(source, "127.0.0.1", 0) as port:
        code, content_type, body = await asyncio.to_thread(_request, port, "/metrics")
    assert code == 200 and content_type.startswith("text/plain")
    samples = {s.name: s for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert samples["things_done_total"].value == 3
    assert samples["things_done_total"].labels == {"kind": "a"}


async def test_head_answers_headers_only(source: CollectorRegistry) -> None:
    async with serve_metrics(source, "127.0.0.1", 0) as port:
        code, _, body = await asyncio.to_thread(_request, port, "/metrics", "HEAD")
    assert code == 200 and body == b""


async def test_other_paths_and_methods_are_refused(source: CollectorRegistry) -> None:
    async with serve_metrics(source, "127.0.0.1", 0) as port:
        missing = await asyncio.to_thread(_request, port, "/")
        posted = await asyncio.to_thread(_request, port, "/metrics", "POST")
    assert missing[0] == 404
    assert posted[0] == 405


async def test_leaving_the_block_closes_the_port_and_idle_connections(
    source: CollectorRegistry,
) -> None:
    async with serve_metrics(source, "127.0.0.1", 0) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # sends nothing
        await asyncio.sleep(0.05)  # accepted by now
        started = asyncio.get_running_loop().time()
    took = asyncio.get_running_loop().time() - started
    assert took < 1.0, f"closing waited {took:.2f} s for an idle connection"
    assert await asyncio.wait_for(_rest(reader), 2.0) == b""  # cut off at once, unanswered
    writer.close()
    assert not port_open(port)


async def _rest(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def test_a_taken_port_is_a_metrics_error_naming_it(
    source: CollectorRegistry, taken_port: int
) -> None:
    with pytest.raises(MetricsError, match=str(taken_port)):
        async with serve_metrics(source, "127.0.0.1", taken_port):
            pass
