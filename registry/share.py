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

from registry.protocol import WorkerInfo, WorkerRegistration

T = TypeVar("T")

MAX_DISTINCT: Final = 4096  # per kind of part; fleets have a handful of each

_encode = msgspec.json.Encoder().encode


class Parts:
    """Caches of equal registration parts, keyed by their canonical form."""

    def __init__(self, max_distinct: int = MAX_DISTINCT) -> None:
        self.max_distinct = max_distinct
        self._hardware: dict[bytes, Any] = {}
        self._types: dict[tuple[str, ...], list[str]] = {}
        self._tags: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}

    def registration(self, reg: WorkerRegistration) -> WorkerRegistration:
        """`reg` with its repeated parts replaced by the shared copies (equal values)."""
        hardware = self._one(self._hardware, _encode(reg.hardware), reg.hardware)
        types = self._one(self._types, tuple(reg.supported_content_types), reg.supported_content_types)
        tags = self._one(self._tags, tuple(reg.tags.items()), reg.tags)
        name = reg.worker_id if reg.name == reg.worker_id else reg.name
        return msgspec.structs.replace(
            reg, hardware=hardware, supported_content_types=types, tags=tags, name=name
        )

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
