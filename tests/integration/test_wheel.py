"""The package as users install it: a wheel (not an editable checkout) in a fresh venv.

The wheel is built from a copy of the source tree (so no stale `build/` can leak
into it), installed without its dependencies into a new virtual environment,
and `registry up --port 0` is run from there, away from the checkout. The
dependencies come from the test environment through a `.pth` file (tests do
not download), and `pip check` proves the wheel's metadata asks for nothing
that is missing. This is the test for "the definitions ship inside the package":
without them nats-server finds no server.conf and the registry provisions nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nats
import pytest

from registry import definitions
from tests.conftest import eventually
from tests.integration.registry_helpers import AVAILABILITY, EVENTS, bounded, registry_process

REPO = Path(__file__).resolve().parents[2]
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
              ".hypothesis", ".mypy_cache", ".ruff_cache", "data")  # fmt: skip


def _pip(*args: str, timeout: float = 120.0) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp), str(src))
    (built,) = tmp.glob("worker_registry-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; dependencies visible through a .pth file."""
    root = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=60)  # fmt: skip
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "test-dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    _pip("--python", str(python), "check")
    return root


def test_the_wheel_ships_every_definition_and_both_packages(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"registry/nats/{rel}" for rel in definitions.listing()} <= names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"registry", "agent"}
    assert {"agent/simulate/__main__.py", "registry/protocol.py"} <= names


def test_installed_package_is_the_wheel_not_the_checkout(venv: Path) -> None:
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import registry, agent.simulate; print(registry.__file__); print(agent.simulate.__file__)"],
        capture_output=True, text=True, check=True, timeout=30, cwd=venv,
    ).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(venv) for p in where), where


@bounded(60)
async def test_registry_up_from_the_wheel_provisions_streams_and_bucket(
    venv: Path, tmp_path: Path
) -> None:
    args = ["up", "--port", "0", "--data-dir", str(tmp_path / "data")]
    command = [str(venv / "bin" / "registry")]
    async with registry_process(args, tmp_path / "stderr.log", command, cwd=tmp_path) as proc:
        url = await proc.first_line(timeout=30.0)
        assert url.startswith("nats://127.0.0.1:"), (url, proc.log_lines()[-3:])
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            streams = {s: (await js.stream_info(s)).config for s in (EVENTS, AVAILABILITY)}
            bucket = await (await js.key_value("workers")).status()
            consumer = await eventually(lambda: js.consumer_info(EVENTS, "registry-projector"))
        finally:
            await nc.close()
        assert await asyncio.wait_for(proc.terminate(), 20.0) == 0
    assert streams[EVENTS].max_msgs_per_subject == definitions.load(
        f"streams/{EVENTS}.json"
    )["max_msgs_per_subject"]
    assert bucket.bucket == "workers" and consumer.config.durable_name == "registry-projector"
