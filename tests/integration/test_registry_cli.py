"""`registry up` as people run it: embedded server, signals, taken ports,
unreachable servers. Each test runs the real command in a child process."""

from __future__ import annotations

import socket
from pathlib import Path

import nats
import pytest

from tests.conftest import eventually, port_open
from tests.integration.registry_helpers import EVENTS, bounded, registry_process


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _embedded(tmp_path: Path) -> list[str]:
    return ["--port", "0", "--data-dir", str(tmp_path / "data")]


@bounded(30)
async def test_up_without_nats_prints_embedded_server_url_first(tmp_path: Path) -> None:
    async with registry_process(_embedded(tmp_path), tmp_path / "stderr.log") as proc:
        url = await proc.first_line()
        assert url.startswith("nats://127.0.0.1:")
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info(EVENTS)  # provisioned
        finally:
            await nc.close()
        assert await proc.terminate() == 0
    assert info.config.name == EVENTS


@bounded(30)
async def test_sigterm_exits_zero_and_stops_embedded_server(tmp_path: Path) -> None:
    async with registry_process(_embedded(tmp_path), tmp_path / "stderr.log") as proc:
        url = await proc.first_line()
        port = int(url.rsplit(":", 1)[1])
        assert port_open(port)
        code = await proc.terminate()
    assert code == 0
    assert not port_open(port)
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()


@bounded(30)
async def test_taken_port_is_a_one_line_error(tmp_path: Path, taken_port: int) -> None:
    args = ["--port", str(taken_port), "--data-dir", str(tmp_path / "data")]
    async with registry_process(args, tmp_path / "stderr.log") as proc:
        code = await proc.wait(20.0)
    lines = proc.log_lines()
    assert code != 0
    assert len(lines) == 1, lines
    assert str(taken_port) in lines[0] and "in use" in lines[0]
    assert "Traceback" not in lines[0]


@bounded(30)
async def test_unreachable_nats_is_retried_and_logged(tmp_path: Path, closed_port: int) -> None:
    url = f"nats://127.0.0.1:{closed_port}"
    async with registry_process(["--nats", url], tmp_path / "stderr.log") as proc:

        def unreachable_twice() -> bool:
            events = [e for e in proc.log_events() if e.get("event") == "nats_unreachable"]
            return len(events) >= 2 and all(e["url"] == url for e in events)

        await eventually(unreachable_twice, timeout=15.0)
        assert proc.proc is not None and proc.proc.returncode is None  # still trying
        code = await proc.terminate()
    assert code == 0
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()
