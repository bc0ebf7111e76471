"""One simulated worker: realistic hardware and location, and load that wanders.

Each simulated worker sends what the real agent sends: a RegisterEvent with
realistic hardware and location, then heartbeats whose load wanders within
its `max_concurrent_tasks`, and an UnregisterEvent when it leaves. The fleet
shares a few dozen machine kinds (`profiles`).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Final

import msgspec

from agent.simulate.wire import Metrics, heartbeat_body, heartbeat_prefix, percent
from registry.protocol import (
    DEFAULT_CONTENT_TYPES,
    GpuInfo,
    HardwareInfo,
    RegisterEvent,
    UnregisterEvent,
    WorkerCapability,
    WorkerLocation,
    WorkerRegistration,
    encode,
    event_subject,
    new_incarnation,
)

ALIVE: Final = 0
DOWN: Final = 1  # silent or restarting; comes back as a new incarnation
DEAD: Final = 2  # killed for good
NEW: Final = 3  # not registered yet (during --ramp)

Profile = tuple[WorkerCapability, HardwareInfo, int]  # capability, hardware, task slots

_GPUS: Final = (  # model, GiB as NVML reports it
    ("NVIDIA A100-SXM4-80GB", 79.15),
    ("NVIDIA H100 80GB HBM3", 79.65),
    ("NVIDIA L40S", 44.52),
    ("NVIDIA A10G", 22.49),
)


def _hardware(capability: WorkerCapability, rng: random.Random) -> HardwareInfo:
    gpus: list[GpuInfo] = []
    if capability is not WorkerCapability.CPU:
        model, mem = rng.choice(_GPUS[:2] if capability is WorkerCapability.GPU else _GPUS[2:])
        count = rng.choice((1, 2, 4, 8) if capability is WorkerCapability.GPU else (1, 2))
        gpus = [GpuInfo(index=i, model=model, memory_gb=mem) for i in range(count)]
    cores = rng.choice((8, 16, 32, 64) if capability is WorkerCapability.CPU else (32, 64, 96))
    return HardwareInfo(
        cpu_cores=cores,
        memory_gb=round(cores * rng.choice((3.84, 7.68)), 2),
        gpu_count=len(gpus),
        gpu_memory_gb=round(float(sum(g.memory_gb for g in gpus)), 2),  # 0.0, not 0, if none
        gpu_models=[g.model for g in gpus],
        disk_space_gb=rng.choice((468.38, 937.33, 1874.66)),
        gpus=gpus,
    )


def profiles(rng: random.Random) -> list[Profile]:
    """A few dozen machine kinds, shared by the fleet: 30% gpu, 50% cpu, 20% hybrid."""
    kinds = [WorkerCapability.GPU] * 3 + [WorkerCapability.CPU] * 5 + [WorkerCapability.HYBRID] * 2
    out = []
    for capability in kinds * 4:
        hw = _hardware(capability, rng)
        slots = hw.gpu_count if capability is WorkerCapability.GPU else max(2, hw.cpu_cores // 8)
        out.append((capability, hw, slots))
    return out


class SimWorker:
    """One simulated worker: its identity, and load that wanders from beat to beat."""

    __slots__ = (
        "active",
        "avg_s",
        "capability",
        "completed",
        "cpu",
        "failed",
        "hardware",
        "idx",
        "incarnation",
        "max_tasks",
        "mem",
        "prefix",
        "state",
        "subject",
        "worker_id",
    )  # fmt: skip

    def __init__(self, idx: int, worker_id: str, profile: Profile, rng: random.Random) -> None:
        self.idx = idx
        self.worker_id = worker_id
        self.capability, self.hardware, self.max_tasks = profile
        self.subject = event_subject("heartbeat", worker_id)
        self.state = NEW
        self.cpu = rng.uniform(2.0, 15.0)  # idle load
        self.mem = rng.uniform(10.0, 35.0)
        self.avg_s = round(rng.lognormvariate(2.0, 0.8), 3)
        self.new_life()

    def new_life(self) -> None:
        """A new process: new incarnation, counters from zero."""
        self.incarnation = new_incarnation()
        self.prefix = heartbeat_prefix(self.worker_id, self.incarnation)
        self.active = self.completed = self.failed = 0

    def registration(self) -> WorkerRegistration:
        i = self.idx
        return WorkerRegistration(
            worker_id=self.worker_id,
            name=self.worker_id,
            capability=self.capability,
            hardware=self._probed_hardware(),
            location=WorkerLocation(
                hostname=f"{self.worker_id}.sim.internal",
                ip_address=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
            ),
            max_concurrent_tasks=self.max_tasks,
            supported_content_types=list(DEFAULT_CONTENT_TYPES[self.capability]),
            tags={"simulated": "true"},
        )

    def _probed_hardware(self) -> HardwareInfo:
        """The machine kind's hardware as a probe reads it on this worker: each GPU
        with its own memory in use and utilization at that moment (the driver's
        idle share), as the real agent's registration carries them."""
        if not self.hardware.gpus:
            return self.hardware
        rng = random.Random(self.idx)
        gpus = [
            msgspec.structs.replace(
                g, memory_used_gb=round(rng.uniform(0.25, 0.6), 2),
                utilization_percent=float(rng.choice((0, 0, 0, 1, 2, 5))),
            )
            for g in self.hardware.gpus
        ]  # fmt: skip
        return msgspec.structs.replace(self.hardware, gpus=gpus)

    def register_body(self, interval_s: float) -> bytes:
        return encode(
            RegisterEvent(
                worker_id=self.worker_id, incarnation=self.incarnation, sent_at=datetime.now(UTC),
                registration=self.registration(), heartbeat_interval_s=interval_s,
            )
        )  # fmt: skip

    def unregister_body(self, reason: str) -> bytes:
        return encode(
            UnregisterEvent(
                worker_id=self.worker_id, incarnation=self.incarnation,
                sent_at=datetime.now(UTC), reason=reason,
            )
        )  # fmt: skip

    def step(self, rng: random.Random) -> None:
        """Between two beats a task may start or finish (about one beat in three)."""
        r = rng.random()
        if r >= 0.3:
            return
        if self.active and (r < 0.15 or self.active == self.max_tasks):
            self.active -= 1
            if r < 0.003:
                self.failed += 1
            else:
                self.completed += 1
        elif self.active < self.max_tasks:
            self.active += 1

    def metrics(self, noise: float) -> Metrics:
        """Usage that follows the load, give or take `noise` percent."""
        busy = self.active / self.max_tasks
        gpu = percent(90.0 * busy + noise) if self.hardware.gpu_count else 0.0
        gpu_mem = round(self.hardware.gpu_memory_gb * gpu / 125.0, 2)
        cpu = percent(self.cpu + 80.0 * busy + noise)
        mem = percent(self.mem + 50.0 * busy + noise / 2)
        avg = self.avg_s if self.completed else 0.0
        return cpu, mem, gpu, self.active, self.completed, self.failed, avg, gpu_mem

    def heartbeat_body(self, sent_at: bytes, noise: float) -> bytes:
        return heartbeat_body(self.prefix, sent_at, self.metrics(noise))
