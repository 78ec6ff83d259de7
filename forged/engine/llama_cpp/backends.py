"""What the loaded libllama can run on, where the model went, and the rule that forbids a silent CPU.

- `inspect()` asks the library itself: `llama_supports_gpu_offload`, and ggml's backend registry
  (`ggml_backend_reg_*`, `ggml_backend_dev_*` through ctypes on the libggml that libllama links,
  found beside it) for every backend and device with its type and memory.
- `LoadLog` reads libllama's own load report from its log lines (forged's log callback in model.py
  feeds it): `offloaded N/M layers to GPU`, and the model, KV and compute buffer sizes per buffer
  type (`CUDA0`, `CPU_Mapped`, ...). That is where the layers and the KV really are.
- `check_offload()`: a profile that wants GPU layers, on a machine whose probe found a GPU, with a
  library that has no GPU device, refuses to start in one line (the library, what it lacks, the
  command that fixes it), unless the profile says `llama_cpp.allow_cpu_fallback: true`; then forged
  runs on the CPU and says so everywhere (`gpu_unused`).
"""

from __future__ import annotations

import ctypes
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from forged.engine.base import EngineError
from forged.engine.llama_cpp.library import LibraryChoice, loaded_path, loaded_sibling

log = logging.getLogger(__name__)

# ggml_backend_dev_type (ggml-backend.h), in its order.
DEVICE_TYPES = ("cpu", "gpu", "igpu", "accel", "meta")
GPU_TYPES = ("gpu", "igpu")
BUILD_COMMAND = "sudo forgectl engine build"


@dataclass(frozen=True)
class Device:
    name: str  # ggml's device name: "CUDA0", "CPU"
    description: str  # "NVIDIA H100 80GB HBM3", the CPU model
    type: str  # cpu | gpu | igpu | accel | meta
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None


@dataclass(frozen=True)
class Library:
    path: str
    source: str
    gpu_offload: bool  # llama_supports_gpu_offload()
    backends: tuple[str, ...]  # ggml's registered backends: "CUDA", "CPU"
    devices: tuple[Device, ...]
    system_info: str = ""  # llama_print_system_info(): the compiled-in features per backend
    # Why a built engine was passed over for this library (library.LibraryChoice.notes).
    notes: tuple[str, ...] = ()

    @property
    def gpu_devices(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.type in GPU_TYPES)

    def lacks(self) -> str:
        """What this library lacks for GPU work, as a predicate: '<path> has no GPU backend (...)'."""
        if self.gpu_devices:
            return ""
        gpu_backends = [b for b in self.backends if b not in ("CPU", "BLAS", "RPC")]
        if gpu_backends:
            return (f"has a {', '.join(gpu_backends)} backend that finds no GPU device (the driver, access to "
                    f"/dev/nvidia*, CUDA_VISIBLE_DEVICES)")
        return f"has no GPU backend (ggml backends: {', '.join(self.backends) or 'none'})"


def inspect(choice: LibraryChoice) -> Library:
    """Ask the libllama that llama_cpp loaded (import llama_cpp first) what it can run on."""
    import llama_cpp as ll

    path = loaded_path()
    if choice.directory is not None and path is not None and path.parent.resolve() != choice.directory.resolve():
        log.warning("llama_cpp was imported before forged chose %s; it runs %s", choice.directory, path)
    backends: list[str] = []
    devices: list[Device] = []
    ggml = _libggml()
    if ggml is not None:
        for i in range(ggml.ggml_backend_reg_count()):
            backends.append(_text(ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i))))
        for i in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            kind = ggml.ggml_backend_dev_type(dev)
            devices.append(Device(_text(ggml.ggml_backend_dev_name(dev)), _text(ggml.ggml_backend_dev_description(dev)),
                                  DEVICE_TYPES[kind] if 0 <= kind < len(DEVICE_TYPES) else str(kind),
                                  total.value or None, free.value or None))
    return Library(path=str(path) if path else "?", source=choice.source,
                   gpu_offload=bool(ll.llama_supports_gpu_offload()), backends=tuple(backends),
                   devices=tuple(devices), system_info=_text(ll.llama_print_system_info()).strip(" |"),
                   notes=choice.notes)


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""


def _libggml() -> Any:
    """libggml beside the loaded libllama (library.loaded_sibling), with the registry calls' types."""
    try:
        lib = loaded_sibling("libggml.so")
    except OSError as exc:
        log.warning("cannot read ggml's device list: %s", exc)
        return None
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, args, res in (("ggml_backend_reg_count", [], sz), ("ggml_backend_reg_get", [sz], vp),
                            ("ggml_backend_reg_name", [vp], ctypes.c_char_p),
                            ("ggml_backend_dev_count", [], sz), ("ggml_backend_dev_get", [sz], vp),
                            ("ggml_backend_dev_name", [vp], ctypes.c_char_p),
                            ("ggml_backend_dev_description", [vp], ctypes.c_char_p),
                            ("ggml_backend_dev_memory", [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)], None),
                            ("ggml_backend_dev_type", [vp], ctypes.c_int)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


# ---------------------------------------------------------------- libllama's load report

_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_BUFFER = re.compile(r"(\S+) (model|KV|compute|RS) buffer size =\s*([\d.]+) MiB")


@dataclass
class LoadLog:
    """What libllama reported while loading the model and creating its context."""

    layers_offloaded: int | None = None
    layers_total: int | None = None
    # Bytes per buffer type, as libllama names them: {"model": {"CUDA0": ..., "CPU_Mapped": ...}, "KV": ...}
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)

    def reset(self) -> None:
        self.layers_offloaded = self.layers_total = None
        self.buffers = {}

    def feed(self, line: str) -> None:
        if m := _OFFLOADED.search(line):
            self.layers_offloaded, self.layers_total = int(m.group(1)), int(m.group(2))
        elif m := _BUFFER.search(line):
            kind = self.buffers.setdefault(m.group(2), {})
            kind[m.group(1)] = kind.get(m.group(1), 0) + round(float(m.group(3)) * 2**20)


# libllama logs through one process-wide callback (model.py), and forged loads one model per process.
LOAD_LOG = LoadLog()


def placement(library: Library, load: LoadLog, n_layer: int | None, gpu_unused: str | None) -> dict[str, Any]:
    """Where the engine really runs, for /v1/status `engine.device`."""
    gpu_names = {d.name for d in library.gpu_devices}
    model = load.buffers.get("model", {})
    kv = load.buffers.get("KV", {})
    on_gpu = sorted(name for name in (*model, *kv) if name in gpu_names)
    described = [f"{d.name} ({d.description})" for d in library.gpu_devices if d.name in on_gpu]
    total = load.layers_total if load.layers_total is not None else (n_layer + 1 if n_layer else None)
    offloaded = load.layers_offloaded if on_gpu else 0
    return {
        "runs_on": ", ".join(described) if described else "CPU",
        "layers_offloaded": offloaded,
        "layers_total": total,
        "kv_on": sorted(kv),
        "model_buffers_bytes": model,
        "kv_buffers_bytes": kv,
        "gpu_unused": gpu_unused,
        "library": library.path,
        "library_source": library.source,
        "library_notes": list(library.notes),
        "gpu_offload": library.gpu_offload,
        "backends": list(library.backends),
        "devices": [vars(d) for d in library.devices],
        "system_info": library.system_info,
    }


# ---------------------------------------------------------------- the rule

class GpuBackendMissing(EngineError):
    """The profile wants the GPU, the machine has one, the library cannot use it: one line. An
    EngineError, so forged exits with status 1 and systemd retries: the next start after
    `forgectl engine build` serves on the GPU without anyone restarting it."""


def check_offload(library: Library, *, profile_name: str, n_gpu_layers: int, allow_cpu_fallback: bool,
                  gpu_name: str | None) -> str | None:
    """None when nothing stands between the profile and the GPU; else the note that the GPU is unused
    (allow_cpu_fallback), or GpuBackendMissing.

    `gpu_name` is the GPU the probe found (None: no GPU, so running on the CPU is no surprise).
    """
    if n_gpu_layers == 0 or gpu_name is None or library.gpu_devices:
        return None
    lacks = library.lacks()
    if allow_cpu_fallback:
        return (f"GPU unused: {gpu_name} is here, but {library.path} {lacks}; running on the CPU "
                f"(llama_cpp.allow_cpu_fallback: true in profile {profile_name}). Build the CUDA engine with "
                f"{BUILD_COMMAND}")
    notes = f" ({'; '.join(library.notes)})" if library.notes else ""
    raise GpuBackendMissing(
        f"profile {profile_name} wants GPU layers (llama_cpp.n_gpu_layers {n_gpu_layers}) on {gpu_name}, but "
        f"{library.path} {lacks}{notes}; fix: {BUILD_COMMAND} (then forged uses it from its next start), or set "
        f"llama_cpp.allow_cpu_fallback: true in the profile to run on the CPU")


def log_library(library: Library) -> None:
    gpus = ", ".join(f"{d.name} {d.description} ({(d.memory_total_bytes or 0) / 2**30:.1f} GiB)"
                     for d in library.gpu_devices) or "none"
    log.info("libllama %s (%s): backends %s; GPU devices: %s", library.path, library.source,
             ", ".join(library.backends) or "?", gpus)


def model_layers(metadata: dict[str, str]) -> int | None:
    """The model's block count from its GGUF metadata (`<arch>.block_count`)."""
    value = metadata.get(f"{metadata.get('general.architecture', '')}.block_count")
    return int(value) if value and value.isdigit() else None
