"""The HTTP gateway as the tests run it: `registry http` in a child process, against a
real registry and nats-server."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.integration.registry_helpers import RegistryProcess, registry_process


def http_command() -> list[str]:
    return [sys.executable, "-m", "registry.cli", "http"]


@contextlib.asynccontextmanager
async def gateway(
    nats_url: str, log_path: Path, *args: str
) -> AsyncIterator[tuple[str, RegistryProcess]]:
    """`registry http --nats URL --port 0 ARGS`: (its base URL, the process)."""
    async with registry_process(["--nats", nats_url, "--port", "0", *args], log_path,
                                command=http_command()) as proc:  # fmt: skip
        url = await proc.first_line(timeout=30.0)
        assert url.startswith("http://"), (url, proc.log_lines()[-5:])
        yield url, proc


@contextlib.asynccontextmanager
async def registry_with_gateway(
    tmp_path: Path, *registry_args: str, http_args: tuple[str, ...] = ()
) -> AsyncIterator[tuple[str, str]]:
    """An embedded-server registry and a gateway on it: (NATS URL, HTTP URL)."""
    args = ["--port", "0", "--data-dir", str(tmp_path / "data"), *registry_args]
    async with registry_process(args, tmp_path / "registry.log") as reg:
        nats_url = await reg.first_line(timeout=30.0)
        async with gateway(nats_url, tmp_path / "http.log", *http_args) as (url, _):
            yield nats_url, url
