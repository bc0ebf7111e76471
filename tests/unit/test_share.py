"""Sharing the parts a fleet's registrations repeat (registry/share.py), and
reading a JetStream message's ack subject (registry/server/jsmeta.py)."""

from __future__ import annotations

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from registry.protocol import GpuInfo, HardwareInfo, WorkerRegistration, encode
from registry.server.jsmeta import ack_meta
from registry.share import Parts
from tests.factories import make_info


def _decoded(worker_id: str, **kw: object) -> WorkerRegistration:
    """A registration as the registry gets it: decoded anew from bytes."""
    reg = make_info(worker_id, **kw).registration  # type: ignore[arg-type]
    return msgspec.json.decode(encode(reg), type=WorkerRegistration)


def test_equal_parts_are_one_object_and_values_are_unchanged() -> None:
    parts = Parts()
    a = _decoded("a", content_types=["audio", "video"], tags={"zone": "eu"})
    b = _decoded("b", content_types=["audio", "video"], tags={"zone": "eu"})
    assert a.hardware is not b.hardware
    sa, sb = parts.registration(a), parts.registration(b)
    assert (sa, sb) == (a, b)  # equal values: the record does not change
    assert sa.hardware is sb.hardware
    assert sa.supported_content_types is sb.supported_content_types
    assert sa.tags is sb.tags
    assert sa.location is not sb.location  # unique to each worker: not shared


def test_different_parts_stay_apart() -> None:
    parts = Parts()
    a = parts.registration(_decoded("a", content_types=["audio"], tags={"zone": "eu"}))
    b = parts.registration(_decoded("b", content_types=["video"], tags={"zone": "us"}))
    assert a.supported_content_types == ["audio"] and b.supported_content_types == ["video"]
    assert a.tags == {"zone": "eu"} and b.tags == {"zone": "us"}
    gpu = msgspec.structs.replace(
        a.hardware, gpus=[GpuInfo(index=0, model="NVIDIA H100", memory_gb=80.0)]
    )
    c = parts.registration(msgspec.structs.replace(_decoded("c"), hardware=gpu))
    assert c.hardware == gpu and c.hardware is not a.hardware


def _gpu_box(worker_id: str, used: list[float]) -> WorkerRegistration:
    gpus = [GpuInfo(index=i, model="NVIDIA H100 80GB HBM3", memory_gb=79.65, memory_used_gb=u)
            for i, u in enumerate(used)]  # fmt: skip
    hw = HardwareInfo(cpu_cores=64, memory_gb=491.52, gpu_count=len(gpus), gpu_memory_gb=79.65 * len(gpus),
                      gpu_models=[g.model for g in gpus], gpus=gpus)  # fmt: skip
    reg = msgspec.structs.replace(_decoded(worker_id), hardware=hw)
    return msgspec.json.decode(encode(reg), type=WorkerRegistration)


def test_hardware_probed_differently_still_shares_gpus_and_model_names() -> None:
    """Two machines of one kind register with their GPUs' memory in use as
    probed: not equal, yet the model list, the names and equal GPUs are one copy."""
    parts = Parts()
    a, b = _gpu_box("a", [0.31, 0.42]), _gpu_box("b", [0.31, 0.57])
    sa, sb = parts.registration(a), parts.registration(b)
    assert (sa, sb) == (a, b)
    assert sa.hardware is not sb.hardware
    assert sa.hardware.gpu_models is sb.hardware.gpu_models
    assert sa.hardware.gpus[0] is sb.hardware.gpus[0]  # equal: 0.31 used on both
    assert sa.hardware.gpus[1] is not sb.hardware.gpus[1]
    assert sa.hardware.gpus[1].model is sb.hardware.gpus[1].model


def test_a_full_cache_starts_again_and_still_returns_equal_values() -> None:
    parts = Parts(max_distinct=2)
    regs = [_decoded(f"w{i}", tags={"n": str(i)}) for i in range(5)]
    assert [parts.registration(r) for r in regs] == regs
    assert len(parts._tags) <= 2


def test_record_shares_its_registration_parts() -> None:
    parts = Parts()
    rec = make_info("a", content_types=["text"])
    shared = parts.record(msgspec.json.decode(encode(rec), type=type(rec)))
    assert shared == rec
    assert parts.record(rec).registration.hardware is shared.registration.hardware


def _msg(reply: str) -> Msg:
    return Msg(None, subject="worker.heartbeat.a", reply=reply)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.WORKER_EVENTS.registry-projector.1.4711.12.1764374400123456789.42",
        "$JS.ACK.hub.ACCHASH.WORKER_EVENTS.registry-projector.2.4711.12.1764374400123456789.0.rnd",
        "$JS.ACK._.ACCHASH.WORKER_EVENTS.registry-projector.2.4711.12.1764374400123456789.7",
    ],
)
def test_ack_meta_reads_what_nats_py_reads(reply: str) -> None:
    meta, ref = ack_meta(_msg(reply)), _msg(reply).metadata
    assert meta.seq == ref.sequence.stream
    assert meta.pending == ref.num_pending
    assert meta.stored_at == ref.timestamp


@pytest.mark.parametrize("reply", ["", "_INBOX.abc", "$JS.ACK.S.C.1.2.3", "$JS.ACK.a.b.c.d.e.f.g.h.i"])
def test_ack_meta_refuses_what_is_not_a_jetstream_ack(reply: str) -> None:
    with pytest.raises((NotJSMessageError, ValueError)):
        ack_meta(_msg(reply))
