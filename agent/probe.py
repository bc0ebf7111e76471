"""What this machine has and how busy it is: psutil and NVML -> protocol structs.

Every call here blocks (psutil, NVML, a socket), so callers on an event loop
run them in a thread. Probing degrades per field: no NVIDIA driver means no
GPUs (logged once at info), a driver error on one GPU marks that GPU's
`GpuInfo.error` and leaves the others alone. NVML is injectable so tests can
hand in a fake module object; nothing else about the machine is faked.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import msgspec
import psutil
import structlog

from registry.protocol import GpuInfo, HardwareInfo, WorkerLocation, WorkerMetrics

GIB: Final = float(2**30)
UNROUTABLE: Final = ("10.255.255.255", 1)  # connect() on UDP picks a route, sends nothing
LOOPBACK: Final = "127.0.0.1"

T = TypeVar("T")


class NvmlApi(Protocol):
    """The part of `pynvml` (nvidia-ml-py) the probe uses; a module satisfies it."""

    @property
    def NVMLError(self) -> type[Exception]: ...

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...


def gib(n_bytes: float) -> float:
    """Bytes -> GiB (2^30), rounded to 2 decimals for readable bodies."""
    return round(n_bytes / GIB, 2)


def outbound_ip() -> str:
    """The address this host would use to reach the network; no packet is sent."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(UNROUTABLE)
            address: str = s.getsockname()[0]
    except OSError:
        return LOOPBACK
    return address if address != "0.0.0.0" else LOOPBACK


def _text(value: str | bytes) -> str:
    """GPU names are bytes from older NVML bindings."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _import_pynvml() -> NvmlApi | None:
    try:
        import pynvml  # noqa: PLC0415 - optional, and only when a probe needs it
    except ImportError:
        return None
    module: NvmlApi = pynvml  # untyped, but it is the protocol's origin
    return module


class Prober:
    """Probes one machine. Thread-safe; `close()` releases NVML."""

    def __init__(self, disk_path: str | Path = ".", nvml: NvmlApi | None = None) -> None:
        """`nvml`: an NVML module object (tests pass a fake); by default pynvml."""
        self.disk_path = Path(disk_path)
        self._nvml = nvml
        self._nvml_ready: bool | None = None  # None: not tried yet
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        psutil.cpu_percent(interval=None)  # prime: the next call measures from here

    # ------------------------------------------------------------ public

    def hardware(self) -> HardwareInfo:
        gpus = self.gpus()
        return HardwareInfo(
            cpu_cores=psutil.cpu_count(logical=True) or 1,
            memory_gb=gib(psutil.virtual_memory().total),
            gpu_count=len(gpus),
            gpu_memory_gb=round(float(sum(g.memory_gb for g in gpus)), 2),
            gpu_models=[g.model or "unknown" for g in gpus],
            disk_space_gb=gib(psutil.disk_usage(str(self.disk_path)).total),
            gpus=gpus,
        )

    def location(self, port: int = 8000) -> WorkerLocation:
        return WorkerLocation(hostname=socket.gethostname(), ip_address=outbound_ip(), port=port)

    def usage(self) -> WorkerMetrics:
        """CPU, memory and GPU load now; task counters are zero (the agent adds them)."""
        healthy = [g for g in self.gpus() if g.error is None]
        gpu_percent = sum(g.utilization_percent for g in healthy) / len(healthy) if healthy else 0.0
        return WorkerMetrics(
            cpu_usage_percent=psutil.cpu_percent(interval=None),
            memory_usage_percent=psutil.virtual_memory().percent,
            gpu_usage_percent=round(gpu_percent, 1),
            gpu_memory_used_gb=round(float(sum(g.memory_used_gb for g in healthy)), 2),
        )

    def gpus(self) -> list[GpuInfo]:
        nvml = self._ready_nvml()
        if nvml is None:
            return []
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as e:
            self._once("gpu_count", "warning", "gpu_count_failed", error=str(e))
            return []
        return [self._gpu(nvml, index) for index in range(count)]

    def close(self) -> None:
        with self._lock:
            if self._nvml_ready and self._nvml is not None:
                with contextlib.suppress(self._nvml.NVMLError):
                    self._nvml.nvmlShutdown()
            self._nvml_ready = None

    # ------------------------------------------------------------ NVML

    def _ready_nvml(self) -> NvmlApi | None:
        """NVML initialised once; None (logged once, at info) when there is none."""
        with self._lock:
            if self._nvml_ready is None:
                self._nvml_ready = self._init_nvml()
            return self._nvml if self._nvml_ready else None

    def _init_nvml(self) -> bool:
        if self._nvml is None:
            self._nvml = _import_pynvml()
        if self._nvml is None:
            self._once("nvml", "info", "nvml_unavailable", reason="pynvml is not installed")
            return False
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as e:
            self._once("nvml", "info", "nvml_unavailable", reason=str(e) or type(e).__name__)
            return False
        return True

    def _gpu(self, nvml: NvmlApi, index: int) -> GpuInfo:
        errors: list[str] = []

        def field(what: str, read: Callable[[], T], default: T) -> T:
            try:
                return read()
            except nvml.NVMLError as e:
                errors.append(f"{what}: {e}")
                return default

        handle = field("handle", lambda: nvml.nvmlDeviceGetHandleByIndex(index), None)
        if handle is None:
            return self._degraded(GpuInfo(index=index), errors)
        name = field("name", lambda: _text(nvml.nvmlDeviceGetName(handle)), "")
        memory = field("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle), None)
        rates = field("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle), None)
        gpu = GpuInfo(
            index=index,
            model=name,
            memory_gb=gib(memory.total) if memory is not None else 0.0,
            memory_used_gb=gib(memory.used) if memory is not None else 0.0,
            utilization_percent=float(rates.gpu) if rates is not None else 0.0,
        )
        return self._degraded(gpu, errors)

    def _degraded(self, gpu: GpuInfo, errors: list[str]) -> GpuInfo:
        if not errors:
            return gpu
        error = "; ".join(errors)
        self._once(f"gpu{gpu.index}", "warning", "gpu_probe_failed", index=gpu.index, error=error)
        return msgspec.structs.replace(gpu, error=error[:1024])

    def _once(self, key: str, level: str, event: str, **fields: Any) -> None:
        """Log a hardware fact once per prober, not on every heartbeat."""
        if key in self._logged:
            return
        self._logged.add(key)
        getattr(structlog.get_logger("agent.probe"), level)(event, **fields)
