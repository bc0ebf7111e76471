"""Test doubles shared by the unit tests (no test module imports another).

`FakeNvml` stands in for the pynvml module, the one thing about the machine
the probe lets tests replace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from agent.probe import GIB


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    name: str | bytes = "NVIDIA L4"
    total_gib: float = 24.0
    used_gib: float = 6.0
    utilization: int = 50
    broken: set[str] = field(default_factory=set)  # calls that raise FakeNVMLError


class FakeNvml:
    """Stands in for the pynvml module: the same function names, canned answers."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[FakeGpu], init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def _gpu(self, index: int, call: str) -> FakeGpu:
        if call in self.gpus[index].broken:
            raise FakeNVMLError(f"{call} failed: GPU is lost")
        return self.gpus[index]

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index, "handle")
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self._gpu(handle, "name").name

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        gpu = self._gpu(handle, "memory")
        return SimpleNamespace(total=gpu.total_gib * GIB, used=gpu.used_gib * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._gpu(handle, "utilization").utilization, memory=0)


def two_gpus() -> FakeNvml:
    return FakeNvml([
        FakeGpu("NVIDIA L4", 24.0, 6.0, 40),
        FakeGpu("NVIDIA A100-SXM4-80GB", 80.0, 20.0, 80),
    ])  # fmt: skip
