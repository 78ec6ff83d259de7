"""What forged runs on, and how much memory the engine's device has right now.

This slice knows the CPU box: model name, cores and memory from /proc. The memory figures are the
ones the kernel itself stands behind: MemTotal, and MemAvailable as the honest free figure (page
cache that can be dropped counts as free; MemFree alone would understate it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class HardwareInfo:
    kind: Literal["jetson", "gpu", "cpu"]
    name: str
    cores: int
    memory_total_bytes: int
    unified_memory: bool


@dataclass(frozen=True)
class MemoryReading:
    used_bytes: int
    total_bytes: int


def read_meminfo(root: Path = Path("/")) -> dict[str, int]:
    """/proc/meminfo as bytes per key."""
    out: dict[str, int] = {}
    for line in (root / "proc/meminfo").read_text().splitlines():
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


def cpu_model(root: Path = Path("/")) -> str:
    try:
        text = (root / "proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return "unknown CPU"


def probe(root: Path = Path("/")) -> HardwareInfo:
    """The CPU box: the only kind this slice detects (GPU and Jetson probing come later)."""
    return HardwareInfo(kind="cpu", name=cpu_model(root), cores=len(os.sched_getaffinity(0)),
                        memory_total_bytes=system_memory(root).total_bytes, unified_memory=True)


def device_memory(hardware: HardwareInfo) -> MemoryReading:
    """Memory of the device the engine runs on: system RAM on CPU and unified-memory machines."""
    return system_memory()
