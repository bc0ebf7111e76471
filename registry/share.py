"""One copy of the parts of registrations that a fleet repeats.

A decoded registration is about forty objects, most of them equal across the
fleet: the hardware of a machine type (GPU models, their memory), the
content-type list of a capability, the tags. The registry holds one record
per worker for as long as it runs, so it keeps one copy of each equal part
and points every record at it; what stays per worker is what is unique to it
(id, name, location).

Records are frozen msgspec structs and the shared lists and dicts inside
them are never mutated by the registry (nothing may mutate a record's parts:
the fold replaces, it does not edit). Each cache is bounded; when one fills,
it starts again, which costs sharing, never correctness.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec

from registry.protocol import GpuInfo, HardwareInfo, WorkerInfo, WorkerRegistration

T = TypeVar("T")

MAX_DISTINCT: Final = 4096  # per kind of part; fleets have a handful of each

_encode = msgspec.json.Encoder().encode


class Parts:
    """Caches of equal registration parts, keyed by their canonical form."""

    def __init__(self, max_distinct: int = MAX_DISTINCT) -> None:
        self.max_distinct = max_distinct
        self._hardware: dict[bytes, HardwareInfo] = {}
        self._gpus: dict[bytes, GpuInfo] = {}
        self._strings: dict[str, str] = {}
        self._models: dict[tuple[str, ...], list[str]] = {}
        self._types: dict[tuple[str, ...], list[str]] = {}
        self._tags: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}

    def registration(self, reg: WorkerRegistration) -> WorkerRegistration:
        """`reg` with its repeated parts replaced by the shared copies (equal values)."""
        hardware = self.hardware(reg.hardware)
        types = reg.supported_content_types
        types = self._one(self._types, tuple(types), types)
        tags = self._one(self._tags, tuple(reg.tags.items()), reg.tags)
        name = reg.worker_id if reg.name == reg.worker_id else reg.name
        return msgspec.structs.replace(
            reg, hardware=hardware, supported_content_types=types, tags=tags, name=name
        )

    def hardware(self, hw: HardwareInfo) -> HardwareInfo:
        """Equal hardware is one object. Hardware that differs (a GPU's memory in
        use and utilization are probed at registration, so two machines of one
        kind rarely register equal) still shares its GPUs where they are equal,
        and the model names and model list where they are not."""
        key = _encode(hw)
        shared = self._hardware.get(key)
        if shared is not None:
            return shared
        if hw.gpus:
            models = [self._text(m) for m in hw.gpu_models]
            hw = msgspec.structs.replace(
                hw, gpu_models=self._one(self._models, tuple(models), models),
                gpus=[self._gpu(g) for g in hw.gpus],
            )  # fmt: skip
        return self._one(self._hardware, key, hw)

    def _gpu(self, gpu: GpuInfo) -> GpuInfo:
        key = _encode(gpu)
        shared = self._gpus.get(key)
        if shared is not None:
            return shared
        return self._one(self._gpus, key, msgspec.structs.replace(gpu, model=self._text(gpu.model)))

    def _text(self, s: str) -> str:
        return self._one(self._strings, s, s)

    def record(self, record: WorkerInfo) -> WorkerInfo:
        return msgspec.structs.replace(record, registration=self.registration(record.registration))

    def _one(self, cache: dict[Any, T], key: Any, value: T) -> T:
        shared = cache.get(key)
        if shared is not None:
            return shared
        if len(cache) >= self.max_distinct:
            cache.clear()
        cache[key] = value
        return value
