"""What machine forged runs on: `probe()` and the `HardwareInfo` it returns.

`probe()` looks in this order and never raises:

1. **Jetson**: the devicetree `model`/`compatible` and `/etc/nv_tegra_release` (`jetson.py`),
   unified memory from /proc/meminfo, the GPU's name, load and compute capability from NVML when it
   answers (on Thor it does, but memory queries answer NOT_SUPPORTED), jtop when its service runs.
2. **Discrete GPU** through nvidia-ml-py (`nvml.py`): every device's name, UUID, compute
   capability and memory (nvmlMemory_v2: total, used, reserved, free), the driver and CUDA
   versions. The GPUs the engine may use are those CUDA_VISIBLE_DEVICES names (all when unset), in
   CUDA's order; the engine's device is the first of them. forged.gpus says which of them a
   profile's engine uses.
3. **Otherwise the CPU**: model, cores, MemTotal.

Everything reads through `root` (a filesystem root) and an `NvmlSession` (over `pynvml` or a test
stand-in), so tests can present a Thor, an RTX 4000 Ada, an H200 or a CPU box. What could not be
read is said in `notes`, and the probe goes on with what it has.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from forged.hardware import jetson as jetson_mod
from forged.hardware import nvml as nvml_mod
from forged.hardware.jetson import JetsonInfo
from forged.hardware.memory import system_memory
from forged.hardware.nvml import NvmlSession, default_nvml, failed

log = logging.getLogger("forged.hardware")

Kind = Literal["jetson", "gpu", "cpu"]


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str | None = None
    compute_capability: str | None = None  # "9.0"
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    memory_free_bytes: int | None = None
    # "nvml v2", "nvml v1", or why there is none ("nvmlDeviceGetMemoryInfo: Not Supported ...").
    memory_source: str | None = None
    utilization_percent: int | None = None


@dataclass(frozen=True)
class HardwareInfo:
    kind: Kind
    # Jetson: the devicetree model; GPU: the engine device's NVML name; CPU: the CPU model.
    name: str
    cores: int
    # The engine device's memory: MemTotal on CPU and unified-memory machines, NVML total on a GPU.
    memory_total_bytes: int
    unified_memory: bool
    compute_capability: str | None = None
    cpu_model: str = ""
    system_memory_total_bytes: int = 0
    # NVML index of the engine's device (None: no discrete GPU in use).
    device_index: int | None = None
    # NVML indices of the GPUs this process sees through CUDA (CUDA_VISIBLE_DEVICES), in CUDA's
    # order: CUDA device i is NVML index cuda_gpus[i].
    cuda_gpus: tuple[int, ...] = ()
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    nvml_version: str | None = None
    jetson: JetsonInfo | None = None
    # What could not be read or was skipped, and why; the probe went on without it.
    notes: tuple[str, ...] = ()

    @property
    def memory_gib(self) -> float:
        return self.memory_total_bytes / 2**30

    @property
    def gpu_count(self) -> int:
        return len(self.cuda_gpus)

    def nvml_gpu(self, index: int) -> GpuInfo | None:
        return next((gpu for gpu in self.gpus if gpu.index == index), None)

    @property
    def gpu(self) -> GpuInfo | None:
        """The engine's GPU (the Jetson's integrated one too), if NVML named one."""
        for gpu in self.gpus:
            if gpu.index == (self.device_index if self.device_index is not None else 0):
                return gpu
        return None


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


@dataclass(frozen=True)
class _NvmlView:
    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    cuda_driver_version: str | None
    nvml_version: str | None
    notes: tuple[str, ...]


def _probe_nvml(session: NvmlSession) -> _NvmlView:
    failure = session.start()
    if failure is not None:
        return _NvmlView((), None, None, None, (f"NVML not used: {failure}",))
    notes: list[str] = []

    def ask(name: str, *args: Any, **kw: Any) -> Any:
        value = session.call(name, *args, **kw)
        if failed(value):
            notes.append(str(value))
            return None
        return value

    driver = ask("nvmlSystemGetDriverVersion")
    cuda = ask("nvmlSystemGetCudaDriverVersion")
    version = ask("nvmlSystemGetNVMLVersion")
    count = ask("nvmlDeviceGetCount") or 0
    gpus = []
    for index in range(count):
        handle = ask("nvmlDeviceGetHandleByIndex", index)
        if handle is None:
            continue
        name = ask("nvmlDeviceGetName", handle) or f"NVIDIA GPU {index} (name unknown)"
        cc = ask("nvmlDeviceGetCudaComputeCapability", handle)
        memory = nvml_mod.device_memory(session, handle)
        util = session.call("nvmlDeviceGetUtilizationRates", handle)
        gpu = GpuInfo(index=index, name=str(name), uuid=ask("nvmlDeviceGetUUID", handle),
                      compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
                      utilization_percent=None if failed(util) else int(util.gpu))
        if failed(memory):
            notes.append(f"GPU {index}: {memory}")
            gpu = replace(gpu, memory_source=f"not available: {memory}")
        else:
            gpu = replace(gpu, memory_total_bytes=memory.total_bytes, memory_used_bytes=memory.used_bytes,
                           memory_reserved_bytes=memory.reserved_bytes, memory_free_bytes=memory.free_bytes,
                           memory_source=memory.source)
        gpus.append(gpu)
    return _NvmlView(tuple(gpus), driver, nvml_mod.cuda_version_text(cuda) if cuda else None, version,
                     tuple(notes))


def cuda_devices(gpus: tuple[GpuInfo, ...], env: Mapping[str, str]) -> tuple[tuple[GpuInfo, ...], str | None]:
    """The GPUs CUDA will show the engine, in CUDA's order: every GPU NVML lists, or those
    CUDA_VISIBLE_DEVICES names, up to the first entry CUDA cannot resolve (CUDA stops there too).

    CUDA numbers devices fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML in PCI order: on a
    box of identical GPUs they agree; on a mixed box name the devices by UUID.
    """
    if not gpus:
        return (), None
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return gpus, None
    seen: list[GpuInfo] = []
    for entry in (part.strip() for part in value.split(",")):
        found = [gpu for gpu in gpus if entry.isdigit() and gpu.index == int(entry)]
        if entry.startswith(("GPU-", "MIG-")):
            found = [gpu for gpu in gpus if gpu.uuid and gpu.uuid.startswith(entry)]
        if len(found) != 1 or found[0] in seen:  # CUDA takes a unique UUID prefix, each device once
            break
        seen.append(found[0])
    if not seen:
        return (), f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU NVML lists"
    indices = ", ".join(str(gpu.index) for gpu in seen)
    return tuple(seen), f"CUDA_VISIBLE_DEVICES={value}: the engine's GPUs are NVML index {indices}, in that order"


def probe(root: Path = Path("/"), *, nvml: NvmlSession | None = None, env: Mapping[str, str] | None = None,
          jtop_module: Any = None, use_jtop: bool = True) -> HardwareInfo:
    """Jetson, else a discrete GPU, else the CPU. Never raises: what fails is said in `notes` (and logged)."""
    info = _probe(root, nvml, env, jtop_module, use_jtop)
    for note in info.notes:
        log.info("probe: %s", note)
    return info


def _probe(root: Path, nvml: NvmlSession | None, env: Mapping[str, str] | None, jtop_module: Any,
           use_jtop: bool) -> HardwareInfo:
    env = os.environ if env is None else env
    session = nvml if nvml is not None else default_nvml()
    cores = len(os.sched_getaffinity(0))
    cpu = cpu_model(root)
    sysmem = system_memory(root)
    notes: list[str] = []
    if sysmem.total_bytes == 0:
        notes.append(f"{root / 'proc/meminfo'}: no MemTotal")

    jetson = jetson_mod.probe(root, jtop_module, use_jtop)
    view = _probe_nvml(session)
    notes.extend(view.notes)
    common = dict(cores=cores, cpu_model=cpu, system_memory_total_bytes=sysmem.total_bytes, gpus=view.gpus,
                  driver_version=view.driver_version, cuda_driver_version=view.cuda_driver_version,
                  nvml_version=view.nvml_version)

    if jetson is not None:
        gpu = view.gpus[0] if view.gpus else None
        cc = (gpu.compute_capability if gpu else None) or jetson_mod.COMPUTE_CAPABILITY_FOR_SOC.get(jetson.soc or "")
        if jetson.jtop.startswith("not used"):
            notes.append(f"jtop {jetson.jtop}")
        return HardwareInfo(kind="jetson", name=jetson.model, memory_total_bytes=sysmem.total_bytes,
                            unified_memory=True, compute_capability=cc, jetson=jetson,
                            device_index=gpu.index if gpu else None, notes=tuple(notes),
                            cuda_gpus=tuple(g.index for g in view.gpus), **common)

    visible, why = cuda_devices(view.gpus, env)
    if why:
        notes.append(why)
    gpu = visible[0] if visible else None
    common["cuda_gpus"] = tuple(g.index for g in visible)
    if gpu is not None:
        if gpu.memory_total_bytes is None:
            # An integrated GPU that NVML lists but whose memory it cannot report (GB10 does this):
            # its memory is the system's.
            notes.append(f"{gpu.name}: NVML reports no memory; treating it as unified memory (MemTotal)")
            return HardwareInfo(kind="gpu", name=gpu.name, memory_total_bytes=sysmem.total_bytes,
                                unified_memory=True, compute_capability=gpu.compute_capability,
                                device_index=gpu.index, notes=tuple(notes), **common)
        return HardwareInfo(kind="gpu", name=gpu.name, memory_total_bytes=gpu.memory_total_bytes,
                            unified_memory=False, compute_capability=gpu.compute_capability,
                            device_index=gpu.index, notes=tuple(notes), **common)

    return HardwareInfo(kind="cpu", name=cpu, memory_total_bytes=sysmem.total_bytes, unified_memory=True,
                        notes=tuple(notes), **common)
