"""engine/runtime/devices.py: the inventory read through a fake NVML, from config, and CPU only."""

from __future__ import annotations

import builtins
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from engine.errors import ConfigError
from engine.runtime.devices import CpuInfo, DeviceInventory, GpuConfig, GpuInfo

MIB = 1024 * 1024
CPU = CpuInfo(cores=8, memory_total_mb=32000)


class NVMLError(Exception):
    """Stands for pynvml's NVMLError (the fake raises it as the real module would)."""


@dataclass
class FakeGpu:
    name: str | bytes
    total_mb: int
    used_mb: int
    utilization: int = 0
    temperature: int = 40
    milliwatts: int | None = 50_000


@dataclass
class FakeNvml:
    """The functions of pynvml that the inventory calls, over a list of fake cards."""

    gpus: list[FakeGpu]
    init_error: Exception | None = None
    calls: list[str] = field(default_factory=list)

    NVML_TEMPERATURE_GPU = 0

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str | bytes:
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        total, used = handle.total_mb * MIB, handle.used_mb * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(gpu=handle.utilization, memory=0)

    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle.temperature

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        if handle.milliwatts is None:
            raise NVMLError("Not Supported")
        return handle.milliwatts


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu("NVIDIA A100-SXM4-40GB", 40960, 1024, utilization=35, temperature=51),
            FakeGpu(b"Tesla T4", 15360, 0, milliwatts=None),
        ]
    )


def test_from_nvml_reads_every_card() -> None:
    nvml = two_gpus()
    inventory = DeviceInventory.from_nvml(nvml, cpu=CPU)

    assert inventory.source == "NVML"
    assert inventory.gpus == (
        GpuInfo(
            index=0,
            name="NVIDIA A100-SXM4-40GB",
            memory_total_mb=40960,
            memory_used_mb=1024,
            utilization_percent=35.0,
            temperature_c=51.0,
            power_watts=50.0,
        ),
        # bytes names (pynvml < 11.5) are decoded; unsupported power is None, not an error
        GpuInfo(
            index=1,
            name="Tesla T4",
            memory_total_mb=15360,
            memory_used_mb=0,
            utilization_percent=0.0,
            temperature_c=40.0,
            power_watts=None,
        ),
    )
    assert inventory.devices == ["cuda:0", "cuda:1", "cpu"]
    assert inventory.gpu(1) is inventory.gpus[1]
    assert inventory.gpu(1).memory_free_mb == 15360  # type: ignore[union-attr]
    assert nvml.calls == ["init", "shutdown"]  # nothing is left open


def test_from_nvml_visible_keeps_only_those_cards() -> None:
    inventory = DeviceInventory.from_nvml(two_gpus(), visible=[1], cpu=CPU)
    assert [gpu.device for gpu in inventory.gpus] == ["cuda:1"]


def test_nvml_init_failure_is_cpu_only(caplog: pytest.LogCaptureFixture) -> None:
    nvml = two_gpus()
    nvml.init_error = NVMLError("Driver Not Loaded")
    with caplog.at_level(logging.INFO, logger="engine.runtime.devices"):
        inventory = DeviceInventory.from_nvml(nvml, cpu=CPU)

    assert inventory.gpus == ()
    assert not inventory.has_gpu
    assert inventory.devices == ["cpu"]
    assert "Driver Not Loaded" in inventory.source
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert inventory.sample() == ()


def test_without_pynvml_is_cpu_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_import = builtins.__import__

    def no_pynvml(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pynvml":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    with caplog.at_level(logging.INFO, logger="engine.runtime.devices"):
        inventory = DeviceInventory.from_nvml(cpu=CPU)

    assert inventory.gpus == ()
    assert inventory.source == "pynvml is not installed"
    assert len(caplog.records) == 1
    assert "pynvml" in caplog.records[0].getMessage()


def test_a_card_that_cannot_be_read_is_left_out() -> None:
    nvml = two_gpus()
    broken = nvml.nvmlDeviceGetMemoryInfo

    def memory(handle: FakeGpu) -> SimpleNamespace:
        if handle is nvml.gpus[0]:
            raise NVMLError("GPU is lost")
        return broken(handle)

    nvml.nvmlDeviceGetMemoryInfo = memory  # type: ignore[method-assign]
    inventory = DeviceInventory.from_nvml(nvml, cpu=CPU)
    assert [gpu.index for gpu in inventory.gpus] == [1]


def test_nvml_without_cards_is_cpu_only() -> None:
    inventory = DeviceInventory.from_nvml(FakeNvml([]), cpu=CPU)
    assert not inventory.has_gpu
    assert "no usable GPU" in inventory.source


def test_sample_reads_live_metrics_and_refresh_keeps_them() -> None:
    nvml = two_gpus()
    inventory = DeviceInventory.from_nvml(nvml, cpu=CPU)
    nvml.gpus[0].used_mb = 9000
    nvml.gpus[0].utilization = 90

    sampled = inventory.sample()
    assert (sampled[0].memory_used_mb, sampled[0].utilization_percent) == (9000, 90.0)
    assert inventory.gpus[0].memory_used_mb == 1024  # sample() changes nothing

    assert inventory.refresh() == sampled
    assert inventory.gpus == sampled
    assert nvml.calls == ["init", "shutdown"] * 3


def test_sample_when_nvml_fails_later_keeps_memory_and_unknown_metrics() -> None:
    nvml = two_gpus()
    inventory = DeviceInventory.from_nvml(nvml, cpu=CPU)
    nvml.init_error = NVMLError("Unknown Error")

    sampled = inventory.sample()
    assert [gpu.memory_used_mb for gpu in sampled] == [1024, 0]
    assert [gpu.utilization_percent for gpu in sampled] == [None, None]
    assert [gpu.power_watts for gpu in sampled] == [None, None]


def test_from_config() -> None:
    inventory = DeviceInventory.from_config(
        [
            {"index": 1, "name": "T4", "memory_mb": 15360},
            GpuConfig(index=0, name="A100", memory_mb=40960, memory_used_mb=512),
        ],
        cpu=CPU,
    )
    assert inventory.source == "configured"
    assert inventory.gpus == (
        GpuInfo(index=0, name="A100", memory_total_mb=40960, memory_used_mb=512),
        GpuInfo(index=1, name="T4", memory_total_mb=15360),
    )
    assert inventory.sample() == inventory.gpus  # nothing live to read


def test_from_config_visible() -> None:
    gpus = [{"index": i, "memory_mb": 16000} for i in range(3)]
    inventory = DeviceInventory.from_config(gpus, visible=[0, 2], cpu=CPU)
    assert inventory.devices == ["cuda:0", "cuda:2", "cpu"]


@pytest.mark.parametrize(
    ("gpus", "visible", "message"),
    [
        ([{"index": 0, "memory_mb": 1, "memroy": 2}], None, "gpus[0]: memroy: Extra inputs"),
        ([{"index": 0}], None, "gpus[0]: memory_mb: Field required"),
        ([{"index": 0, "memory_mb": 0}], None, "gpus[0]: memory_mb: Input should be greater"),
        ([{"index": 0, "memory_mb": 1}] * 2, None, "GPU indices must be unique"),
        ([{"index": 0, "memory_mb": 1}], [3], "visible: GPU indices [3] are not configured"),
    ],
)
def test_from_config_rejects(
    gpus: list[dict[str, Any]], visible: list[int] | None, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        DeviceInventory.from_config(gpus, visible=visible, cpu=CPU)
    assert message in str(info.value)


def test_cpu_only_and_log_lines() -> None:
    inventory = DeviceInventory.cpu_only(CPU)
    assert inventory.log_lines() == ["no GPU: CPU only", "cpu: 8 cores, 32000 MB"]
    gpu = DeviceInventory.from_config([{"index": 0, "name": "A100", "memory_mb": 40960}], cpu=CPU)
    assert gpu.log_lines()[0] == "cuda:0: A100, 40960 MB (0 MB in use)"


def test_cpu_detect(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32768000 kB\nMemFree:        1000 kB\n")
    cpu = CpuInfo.detect(meminfo)
    assert cpu.memory_total_mb == 32000
    assert cpu.cores >= 1
    # an unreadable file falls back to sysconf; never raises
    assert CpuInfo.detect(tmp_path / "absent").cores >= 1
