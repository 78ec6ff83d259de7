"""How much memory the engine's devices have right now: /proc/meminfo, and NVML for a discrete GPU.

Memory figures: on CPU boxes and unified-memory machines MemTotal, and MemAvailable as the honest
free figure (page cache that can be dropped counts as free); on a discrete GPU NVML's v2 figures,
whose `used` excludes driver-reserved memory as nvidia-smi shows it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from forged.hardware import nvml as nvml_mod
from forged.hardware.nvml import NvmlSession, default_nvml, failed

if TYPE_CHECKING:  # machine.py reads memory through this module; the import runs one way only
    from forged.hardware.machine import HardwareInfo

log = logging.getLogger("forged.hardware")


@dataclass(frozen=True)
class MemoryReading:
    used_bytes: int
    total_bytes: int
    # Driver-reserved memory on a discrete GPU (NVML v2); 0 elsewhere.
    reserved_bytes: int = 0

    @property
    def available_bytes(self) -> int:
        """What an allocation can still get: MemAvailable, or NVML v2 free (total - reserved - used)."""
        return max(self.total_bytes - self.used_bytes - self.reserved_bytes, 0)


def read_meminfo(root: Path = Path("/")) -> dict[str, int]:
    """/proc/meminfo as bytes per key ({} when it cannot be read)."""
    out: dict[str, int] = {}
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            factor = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
            out[key] = int(parts[0]) * factor
    return out


def system_memory(root: Path = Path("/")) -> MemoryReading:
    info = read_meminfo(root)
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0))
    return MemoryReading(used_bytes=max(total - available, 0), total_bytes=total)


_warned_memory = False


def device_memory(hardware: HardwareInfo, *, root: Path = Path("/"), nvml: NvmlSession | None = None,
                  gpus: tuple[int, ...] | None = None) -> MemoryReading:
    """Memory of the devices the engine runs on, read now.

    Discrete GPUs: NVML v2 used/reserved/total, summed over `gpus` (NVML indices; default: the
    engine's first GPU). CPU boxes and unified-memory machines (Jetson): MemTotal, and MemTotal -
    MemAvailable as used. If NVML stops answering, the probe's reading stands in (logged once).
    """
    if hardware.unified_memory or hardware.device_index is None:
        return system_memory(root)
    readings = [gpu_memory(hardware, index, nvml=nvml) for index in (gpus or (hardware.device_index,))]
    return MemoryReading(sum(r.used_bytes for r in readings), sum(r.total_bytes for r in readings),
                         sum(r.reserved_bytes for r in readings))


def gpu_memory(hardware: HardwareInfo, index: int, *, nvml: NvmlSession | None = None) -> MemoryReading:
    """One discrete GPU's memory (NVML index), read now; the probe's reading if NVML stops answering."""
    global _warned_memory
    session = nvml if nvml is not None else default_nvml()
    handle = session.call("nvmlDeviceGetHandleByIndex", index)
    memory = handle if failed(handle) else nvml_mod.device_memory(session, handle)
    if not failed(memory):
        return MemoryReading(memory.used_bytes, memory.total_bytes, memory.reserved_bytes)
    if not _warned_memory:
        log.warning("GPU memory read failed (%s); reporting the reading taken at start", memory)
        _warned_memory = True
    gpu = hardware.nvml_gpu(index)
    return MemoryReading(gpu.memory_used_bytes or 0 if gpu else 0, gpu.memory_total_bytes or 0 if gpu else 0,
                         gpu.memory_reserved_bytes or 0 if gpu else 0)
