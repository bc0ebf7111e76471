"""The probe: real psutil figures, and NVML through a fake module (no GPU here)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import msgspec
import psutil
from structlog.testing import capture_logs

from agent.probe import Prober, outbound_ip
from registry.protocol import HardwareInfo, WorkerLocation, WorkerMetrics
from tests.unit.fakes import FakeGpu, FakeNvml, FakeNVMLError, two_gpus


def test_two_gpus_fill_hardware_info() -> None:
    hw = Prober(nvml=two_gpus()).hardware()
    assert hw.gpu_count == 2
    assert hw.gpu_memory_gb == 104.0
    assert hw.gpu_models == ["NVIDIA L4", "NVIDIA A100-SXM4-80GB"]
    assert [(g.index, g.memory_gb, g.memory_used_gb, g.error) for g in hw.gpus] == [
        (0, 24.0, 6.0, None),
        (1, 80.0, 20.0, None),
    ]


def test_two_gpus_feed_usage_metrics() -> None:
    metrics = Prober(nvml=two_gpus()).usage()
    assert metrics.gpu_usage_percent == 60.0  # mean of 40 and 80
    assert metrics.gpu_memory_used_gb == 26.0
    assert metrics.active_tasks == 0 and metrics.completed_tasks == 0


def test_nvml_is_initialised_once_and_shut_down_on_close() -> None:
    nvml = two_gpus()
    prober = Prober(nvml=nvml)
    prober.hardware()
    prober.usage()
    prober.close()
    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 1)


def test_missing_driver_reports_no_gpus_and_logs_once_at_info() -> None:
    nvml = FakeNvml([], init_error=FakeNVMLError("NVML Shared Library Not Found"))
    with capture_logs() as logs:
        prober = Prober(nvml=nvml)
        hardware = prober.hardware()
        prober.usage()
        prober.hardware()
        prober.close()
    assert (hardware.gpu_count, hardware.gpus, hardware.gpu_models) == (0, [], [])
    assert logs == [
        {
            "event": "nvml_unavailable",
            "log_level": "info",
            "reason": "NVML Shared Library Not Found",
        }
    ]
    assert nvml.init_calls == 1 and nvml.shutdown_calls == 0


def test_one_failing_gpu_is_degraded_and_the_other_is_intact() -> None:
    nvml = two_gpus()
    nvml.gpus[1].broken = {"memory", "utilization"}
    with capture_logs() as logs:
        prober = Prober(nvml=nvml)
        hardware = prober.hardware()
        metrics = prober.usage()
    ok, bad = hardware.gpus
    assert ok.error is None and ok.memory_gb == 24.0
    assert bad.model == "NVIDIA A100-SXM4-80GB" and bad.memory_gb == 0.0
    assert bad.error is not None and "memory" in bad.error and "utilization" in bad.error
    assert hardware.gpu_count == 2
    assert metrics.gpu_usage_percent == 40.0  # the broken GPU is left out
    assert [e["event"] for e in logs] == ["gpu_probe_failed"]  # once, not per heartbeat
    assert logs[0]["log_level"] == "warning"


def test_gpu_without_a_handle_is_listed_as_unknown() -> None:
    nvml = two_gpus()
    nvml.gpus[0].broken = {"handle"}
    hardware = Prober(nvml=nvml).hardware()
    assert hardware.gpu_models == ["unknown", "NVIDIA A100-SXM4-80GB"]
    assert hardware.gpus[0].error is not None and "handle" in hardware.gpus[0].error


def test_bytes_gpu_names_from_old_drivers_are_decoded() -> None:
    hardware = Prober(nvml=FakeNvml([FakeGpu(name=b"Tesla T4")])).hardware()
    assert hardware.gpu_models == ["Tesla T4"]


def test_hardware_matches_psutil_for_this_machine(tmp_path: Path) -> None:
    hardware = Prober(tmp_path, nvml=FakeNvml([])).hardware()
    assert hardware.cpu_cores == psutil.cpu_count(logical=True)
    assert hardware.memory_gb == round(psutil.virtual_memory().total / 2**30, 2)
    assert hardware.disk_space_gb == round(psutil.disk_usage(str(tmp_path)).total / 2**30, 2)


def test_real_nvml_on_this_machine_never_raises() -> None:
    prober = Prober()  # pynvml: no driver here, a real one on a GPU box
    hardware = prober.hardware()
    prober.usage()
    prober.close()
    assert hardware.gpu_count == len(hardware.gpus)


def test_probe_results_validate_against_the_wire_contract() -> None:
    prober = Prober(nvml=two_gpus())
    for value, kind in (
        (prober.hardware(), HardwareInfo),
        (prober.location(9000), WorkerLocation),
        (prober.usage(), WorkerMetrics),
    ):
        assert msgspec.json.decode(msgspec.json.encode(value), type=kind) == value


def test_outbound_ip_is_an_address() -> None:
    assert ipaddress.ip_address(outbound_ip()).version == 4
