"""Sampling profiles with py-spy (optional: `pip install py-spy` into the venv).

`PySpy(path)` records this process while the `async with` block runs and
writes py-spy's raw (folded stacks) output; `summary(path)` turns it into the
self and inclusive shares per function that bench/results/*-profile.txt shows.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from types import TracebackType
from typing import Self

_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class PySpy:
    """Record the current process (or `pid`) with py-spy while the block runs."""

    def __init__(self, path: Path, pid: int | None = None, rate: int = 250) -> None:
        self.path = path
        self.pid = pid or os.getpid()
        self.rate = rate
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Self:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
        self.proc = await asyncio.create_subprocess_exec(
            exe, "record", "-p", str(self.pid), "-r", str(self.rate), "-f", "raw",
            "-o", str(self.path), "--nonblocking",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(0.5)  # attached
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(self.proc.wait(), 30.0)


def summary(path: Path, top_self: int = 30, top_incl: int = 45, skip_idle: bool = True) -> str:
    """Self and inclusive share of samples per function (file name only, no line)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        if skip_idle and frames[-1].startswith(("select (", "EpollSelector.select", "poll (")):
            idle += n
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [
        f"samples: {total} busy (+{idle} idle in the selector)",
        "",
        "self time (share of busy samples):",
    ]
    out += [f"{100 * n / total:6.1f}%  {f}" for f, n in own.most_common(top_self)]
    out += ["", "inclusive time:"]
    out += [f"{100 * n / total:6.1f}%  {f}" for f, n in incl.most_common(top_incl)]
    return "\n".join(out) + "\n"
