"""The device inventory: the GPUs (read through NVML, or given explicitly) and the CPU.

Placement (:mod:`engine.runtime.placement`) packs models onto what this module reports;
monitoring calls :meth:`DeviceInventory.sample` for live metrics.  Three ways to build one::

    DeviceInventory.from_nvml()                          # the real cards; CPU only without NVML
    DeviceInventory.from_config([{"index": 0, "name": "A100", "memory_mb": 40960}])
    DeviceInventory.cpu_only()

GPU indices are NVML's, which follow the PCI bus order.  CUDA numbers cards fastest first unless
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set, so workers must set it for ``cuda:N`` to name the card
that NVML calls ``N`` (on a mixed-model machine the two orders differ).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import ConfigError

logger = logging.getLogger(__name__)

#: bytes in one MiB, the unit of every ``*_mb`` field (NVML reports bytes)
_MIB = 1024 * 1024

#: NVML's ``NVML_TEMPERATURE_GPU`` sensor, used when the module given does not define it
_NVML_TEMPERATURE_GPU = 0

#: where Linux reports the machine's memory
_MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU, as read at one moment.

    Memory is in MiB (called MB throughout dagserve, as ``nvidia-smi`` does).
    """

    index: int
    """NVML index of the card; placement calls it ``cuda:<index>``."""
    name: str
    """Product name, e.g. ``NVIDIA A100-SXM4-40GB``."""
    memory_total_mb: int
    """Memory of the card."""
    memory_used_mb: int = 0
    """Memory in use when read (by any process); placement subtracts it at startup."""
    uuid: str | None = None
    """NVML UUID (``GPU-...``), when known."""
    utilization_percent: float | None = None
    """Share of the last sample period in which a kernel ran, 0-100; None when unknown."""
    temperature_c: float | None = None
    """Die temperature in degrees Celsius; None when unknown or unsupported."""
    power_watts: float | None = None
    """Power draw in watts; None when unknown or unsupported."""

    @property
    def device(self) -> str:
        """The device string that names this card in pipelines: ``cuda:<index>``."""
        return f"cuda:{self.index}"

    @property
    def memory_free_mb(self) -> int:
        """Memory not in use when read."""
        return max(0, self.memory_total_mb - self.memory_used_mb)


@dataclass(frozen=True)
class CpuInfo:
    """The CPU side of the machine."""

    cores: int
    """Cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    memory_total_mb: int | None
    """Memory of the machine; None when it cannot be read."""

    @classmethod
    def detect(cls, meminfo: Path = _MEMINFO) -> CpuInfo:
        """Read the cores from the OS and the memory from ``/proc/meminfo`` (or ``sysconf``).

        Args:
            meminfo: the file to read ``MemTotal`` from.

        Returns:
            What this machine has; never raises.
        """
        return cls(cores=_cpu_cores(), memory_total_mb=_memory_total_mb(meminfo))


class GpuConfig(BaseModel):
    """One GPU of an explicit inventory: for tests, machines without NVML, or to reserve cards.

    Example (YAML): ``{index: 0, name: A100, memory_mb: 40960}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    """The card's number: placement calls it ``cuda:<index>``."""
    name: str = "GPU"
    """Product name, for logs."""
    memory_mb: int = Field(gt=0)
    """Memory of the card, in MiB."""
    memory_used_mb: int = Field(0, ge=0)
    """Memory already in use by something else, subtracted by placement."""
    uuid: str | None = None
    """NVML UUID, when known."""

    def to_info(self) -> GpuInfo:
        """The :class:`GpuInfo` this entry describes (no live metrics)."""
        return GpuInfo(
            index=self.index,
            name=self.name,
            memory_total_mb=self.memory_mb,
            memory_used_mb=min(self.memory_used_mb, self.memory_mb),
            uuid=self.uuid,
        )


class DeviceInventory:
    """The GPUs and the CPU that models can be placed on.

    Build one with :meth:`from_nvml`, :meth:`from_config` or :meth:`cpu_only`; the constructor
    takes already-read values.

    Args:
        gpus: the cards, in any order (kept sorted by index).
        cpu: the CPU; detected when omitted.
        source: where the GPUs came from (``"NVML"``, ``"configured"``), or why there is none
            (``"pynvml is not installed"``), for logs and error messages.
        nvml: the NVML module that :meth:`sample` reads again; None for a fixed inventory.
    """

    def __init__(
        self,
        gpus: Sequence[GpuInfo] = (),
        cpu: CpuInfo | None = None,
        *,
        source: str = "configured",
        nvml: Any = None,
    ) -> None:
        self._gpus = tuple(sorted(gpus, key=lambda gpu: gpu.index))
        indices = [gpu.index for gpu in self._gpus]
        if len(set(indices)) != len(indices):
            msg = f"GPU indices must be unique (got {indices})"
            raise ConfigError(msg)
        self.cpu = cpu if cpu is not None else CpuInfo.detect()
        self.source = source
        self._nvml = nvml

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_nvml(
        cls,
        nvml: Any = None,
        *,
        visible: Sequence[int] | None = None,
        cpu: CpuInfo | None = None,
    ) -> DeviceInventory:
        """Read the GPUs through NVML; without it, a CPU-only inventory.

        Never raises for a missing or broken NVML: when ``pynvml`` (package ``nvidia-ml-py``)
        is not installed, or ``nvmlInit`` or ``nvmlDeviceGetCount`` fails (no driver, no card),
        the inventory has no GPU and one info line says why.  A card whose name or memory
        cannot be read is left out with a warning; a metric that cannot be read (power and
        temperature are unsupported on some cards) is None.

        Args:
            nvml: the NVML module, or any object with its functions (``nvmlInit``,
                ``nvmlDeviceGetCount``, ``nvmlDeviceGetHandleByIndex``, ...); ``pynvml`` is
                imported when omitted.
            visible: NVML indices to keep; every card when omitted.
            cpu: the CPU; detected when omitted.

        Returns:
            The inventory; its :meth:`sample` reads the same module again.
        """
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                logger.info("no GPU inventory: pynvml (nvidia-ml-py) is not installed; CPU only")
                return cls((), cpu, source="pynvml is not installed")
            nvml = pynvml
        try:
            gpus = _read_all(nvml, visible)
        except Exception as exc:  # NVML's own NVMLError, or anything an injected reader raises
            logger.info("no GPU inventory: NVML is unavailable (%s); CPU only", exc)
            return cls((), cpu, source=f"NVML is unavailable: {exc}")
        if not gpus:
            logger.info("no GPU inventory: NVML reports no usable GPU; CPU only")
            return cls((), cpu, source="NVML reports no usable GPU")
        return cls(gpus, cpu, source="NVML", nvml=nvml)

    @classmethod
    def from_config(
        cls,
        gpus: Sequence[GpuConfig | Mapping[str, Any]],
        *,
        visible: Sequence[int] | None = None,
        cpu: CpuInfo | None = None,
    ) -> DeviceInventory:
        """An explicit inventory: no NVML call, and :meth:`sample` returns the same values.

        Args:
            gpus: the cards, as :class:`GpuConfig` or plain mappings
                (``[{"index": 0, "name": "A100", "memory_mb": 40960}]``).
            visible: indices to keep; every card when omitted.
            cpu: the CPU; detected when omitted.

        Returns:
            The inventory.

        Raises:
            ConfigError: an entry is invalid, two entries share an index, or ``visible``
                names an index that is not configured.
        """
        configs: list[GpuConfig] = []
        for position, entry in enumerate(gpus):
            try:
                configs.append(
                    entry if isinstance(entry, GpuConfig) else GpuConfig.model_validate(entry)
                )
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                    for error in exc.errors()
                )
                msg = f"gpus[{position}]: {problems}"
                raise ConfigError(msg) from exc
        infos = [config.to_info() for config in configs]
        if visible is not None:
            missing = sorted(set(visible) - {info.index for info in infos})
            if missing:
                msg = f"visible: GPU indices {missing} are not configured"
                raise ConfigError(msg)
            infos = [info for info in infos if info.index in set(visible)]
        return cls(infos, cpu, source="configured")

    @classmethod
    def cpu_only(cls, cpu: CpuInfo | None = None) -> DeviceInventory:
        """An inventory without GPUs (``--device cpu``, tests).

        Args:
            cpu: the CPU; detected when omitted.
        """
        return cls((), cpu, source="CPU only")

    # -- reading -----------------------------------------------------------------------------

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        """The cards, sorted by index, as last read."""
        return self._gpus

    @property
    def has_gpu(self) -> bool:
        """Whether there is at least one card."""
        return bool(self._gpus)

    def gpu(self, index: int) -> GpuInfo | None:
        """The card of that index, or None."""
        return next((gpu for gpu in self._gpus if gpu.index == index), None)

    @property
    def devices(self) -> list[str]:
        """Every device string: ``cuda:<index>`` for each card, then ``cpu``."""
        return [gpu.device for gpu in self._gpus] + ["cpu"]

    def sample(self) -> tuple[GpuInfo, ...]:
        """Read live metrics (memory used, utilization, temperature, power) of the same cards.

        Does not change the inventory (see :meth:`refresh`).  NVML is initialised and shut
        down around each read, so the inventory holds nothing open.  Never raises: a card
        that cannot be read keeps its last memory figures with its live metrics set to None,
        and a failed ``nvmlInit`` logs a warning and does the same for every card.
        An explicit inventory returns its configured values.

        Returns:
            One :class:`GpuInfo` per card of the inventory, sorted by index.
        """
        if self._nvml is None or not self._gpus:
            return self._gpus
        try:
            self._nvml.nvmlInit()
        except Exception as exc:  # NVML's own NVMLError, or anything an injected reader raises
            logger.warning("cannot sample the GPUs: NVML is unavailable (%s)", exc)
            return tuple(_unknown(gpu) for gpu in self._gpus)
        try:
            return tuple(self._sample_one(gpu) for gpu in self._gpus)
        finally:
            _shutdown(self._nvml)

    def refresh(self) -> tuple[GpuInfo, ...]:
        """Like :meth:`sample`, and keep the result as :attr:`gpus`.

        Place models (:func:`engine.runtime.placement.place`) before loading them: after a refresh,
        ``memory_used_mb`` includes what the loaded models took.

        Returns:
            The cards as just read.
        """
        self._gpus = self.sample()
        return self._gpus

    def _sample_one(self, previous: GpuInfo) -> GpuInfo:
        try:
            return _read_gpu(self._nvml, previous.index)
        except Exception as exc:  # NVML's own NVMLError, or anything an injected reader raises
            logger.warning("cannot sample %s: %s", previous.device, exc)
            return _unknown(previous)

    def log_lines(self) -> list[str]:
        """Lines for the startup log: one per card, then the CPU."""
        lines = [
            f"{gpu.device}: {gpu.name}, {gpu.memory_total_mb} MB ({gpu.memory_used_mb} MB in use)"
            for gpu in self._gpus
        ]
        if not self._gpus:
            lines.append(f"no GPU: {self.source}")
        memory = self.cpu.memory_total_mb
        lines.append(
            f"cpu: {self.cpu.cores} cores, "
            + (f"{memory} MB" if memory is not None else "memory unknown")
        )
        return lines

    def __repr__(self) -> str:
        gpus = list(self._gpus)
        return f"DeviceInventory(gpus={gpus!r}, cpu={self.cpu!r}, source={self.source!r})"


# -- NVML reading (every call into the module goes through these) ------------------------------


def _read_all(nvml: Any, visible: Sequence[int] | None) -> list[GpuInfo]:
    """Init, read every (visible) card, shut down; raises only when NVML itself is unusable."""
    nvml.nvmlInit()
    try:
        count = int(nvml.nvmlDeviceGetCount())
        indices = list(range(count))
        if visible is not None:
            unknown = sorted(set(visible) - set(indices))
            if unknown:
                logger.warning(
                    "visible: GPU indices %s are absent (NVML counts %d)", unknown, count
                )
            indices = [index for index in indices if index in set(visible)]
        gpus: list[GpuInfo] = []
        for index in indices:
            try:
                gpus.append(_read_gpu(nvml, index))
            except Exception as exc:  # one broken card must not hide the others
                logger.warning("leaving out cuda:%d: cannot read it through NVML (%s)", index, exc)
        return gpus
    finally:
        _shutdown(nvml)


def _read_gpu(nvml: Any, index: int) -> GpuInfo:
    """One card; raises when its name or memory cannot be read, None for any other metric."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(nvml, "nvmlDeviceGetUtilizationRates", handle)
    temperature = _optional(
        nvml,
        "nvmlDeviceGetTemperature",
        handle,
        getattr(nvml, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU),
    )
    milliwatts = _optional(nvml, "nvmlDeviceGetPowerUsage", handle)
    uuid = _optional(nvml, "nvmlDeviceGetUUID", handle)
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_mb=int(memory.total) // _MIB,
        memory_used_mb=int(memory.used) // _MIB,
        uuid=_text(uuid) if uuid is not None else None,
        utilization_percent=float(utilization.gpu) if utilization is not None else None,
        temperature_c=float(temperature) if temperature is not None else None,
        power_watts=float(milliwatts) / 1000 if milliwatts is not None else None,
    )


def _optional(nvml: Any, function: str, *args: Any) -> Any:
    """Call an NVML function that may be absent or unsupported on this card; None then."""
    reader = getattr(nvml, function, None)
    if reader is None:
        return None
    try:
        return reader(*args)
    except Exception:  # NVMLError_NotSupported and kin: the metric is unknown, not an error
        return None


def _shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception as exc:  # nothing to recover; the read itself succeeded or already failed
        logger.debug("nvmlShutdown failed: %s", exc)


def _text(value: Any) -> str:
    # pynvml before 11.5 returns bytes, later versions str
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _unknown(gpu: GpuInfo) -> GpuInfo:
    return dataclasses.replace(gpu, utilization_percent=None, temperature_c=None, power_watts=None)


# -- CPU --------------------------------------------------------------------------------------


def _cpu_cores() -> int:
    # the affinity mask is what a container or taskset actually grants; cpu_count() ignores it
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _memory_total_mb(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // _MIB
    except (AttributeError, ValueError, OSError):
        return None
