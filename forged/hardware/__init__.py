"""The machine forged runs on: what it is, and how much memory its engine's devices have now.

One source per file: `machine.py` (`probe()`: Jetson, else a discrete GPU, else the CPU; `HardwareInfo`),
`memory.py` (live memory readings: /proc/meminfo, NVML), `nvml.py` (nvidia-ml-py behind a session
that never raises), `jetson.py` (the board's own files, and jtop when its service runs). The names
below are the package's public face: `from forged.hardware import HardwareInfo, probe`.
"""

from forged.hardware.machine import GpuInfo, HardwareInfo, Kind, cpu_model, cuda_devices, probe
from forged.hardware.memory import MemoryReading, device_memory, gpu_memory, read_meminfo, system_memory
from forged.hardware.nvml import default_nvml

__all__ = ["GpuInfo", "HardwareInfo", "Kind", "MemoryReading", "cpu_model", "cuda_devices", "default_nvml",
           "device_memory", "gpu_memory", "probe", "read_meminfo", "system_memory"]
