"""Which libllama forged loads: an engine built on this machine, an explicit path, or the vendored one.

llama-cpp-python loads `libllama.so` from `$LLAMA_CPP_LIB_PATH` when that is set, else from its own
package (the CPU build vendored with forged). `forgectl engine build` (forged/ctl/engine.py) compiles
a CUDA libllama on the machine into `<state dir>/engines/<key>/lib` and points `engines/current` at
it. `choose()` runs before the first `import llama_cpp`: it takes an explicit `LLAMA_CPP_LIB_PATH` as
it is, else uses `engines/current` when its build record fits (the same llama-cpp-python version,
this CPU architecture, the GPU the probe found), else leaves the vendored library. Why an engine was
passed over is said in `notes`, and the refusal in backends.py repeats it.

The layout is shared with the builder:

    <state dir>/engines/
      current -> llama.cpp-0.3.36-cuda13.0-sm90-1a2b3c4d5e      (symlink, replaced atomically)
      llama.cpp-0.3.36-cuda13.0-sm90-1a2b3c4d5e/
        lib/libllama.so, libggml*.so                            (RUNPATH $ORIGIN and the CUDA libraries)
        build.json                                              (BuildRecord)
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

LIB_ENV = "LLAMA_CPP_LIB_PATH"
ENGINES = "engines"
CURRENT = "current"
RECORD = "build.json"
# The Python binding's own name on PyPI: its version pins the llama.cpp source (and ABI) it binds.
BINDING = "llama_cpp_python"


def binding_version() -> str | None:
    """The installed llama-cpp-python's version, read without importing it (and so its libllama)."""
    try:
        return metadata.version(BINDING)
    except metadata.PackageNotFoundError:
        return None


def engines_dir(state_dir: Path) -> Path:
    return state_dir / ENGINES


def cuda_architecture(compute_capability: str | None) -> int | None:
    """'8.7' -> 87, '11.0' -> 110: the CMAKE_CUDA_ARCHITECTURES value (sm_XX) for a compute capability."""
    if not compute_capability:
        return None
    major, _, minor = compute_capability.partition(".")
    if not major.isdigit() or not (minor or "0").isdigit():
        return None
    return int(major) * 10 + int(minor or 0)


@dataclass(frozen=True)
class BuildRecord:
    """What `forgectl engine build` built: written last, so a directory without it is not an engine."""

    key: str
    llama_cpp_python: str
    backend: str  # "cuda"
    cuda_architecture: int  # 90: sm_90
    machine: str  # platform.machine() of the build: x86_64, aarch64
    cuda_version: str  # nvcc's release, "13.0"
    nvcc: str
    cmake_args: list[str] = field(default_factory=list)
    source: str = ""  # the source tarball and its sha256
    built_at: str = ""
    build_seconds: float = 0.0
    forged: str = ""

    def write(self, directory: Path) -> None:
        (directory / RECORD).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> BuildRecord:
        """Raises OSError or ValueError when the record is missing or unreadable."""
        doc = json.loads((directory / RECORD).read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass(frozen=True)
class LibraryChoice:
    """The libllama directory llama-cpp-python will load, and why."""

    directory: Path | None  # None: llama-cpp-python's own (vendored) library
    source: str  # how it was chosen, for the log and /v1/status
    record: BuildRecord | None = None
    # Why an engine built by `forgectl engine build` was not used (empty when none was passed over).
    notes: tuple[str, ...] = ()


def choose(state_dir: Path, compute_capability: str | None, *, env: dict[str, str] | None = None) -> LibraryChoice:
    """The libllama to load, decided before llama_cpp is imported. Sets LLAMA_CPP_LIB_PATH (in `env`,
    os.environ by default) when it picks a built engine.

    `compute_capability` is the probe's for the engine's GPU (None: no GPU found, so a CUDA engine is
    not used: its CUDA libraries may not even load there).
    """
    env = os.environ if env is None else env  # type: ignore[assignment]
    explicit = env.get(LIB_ENV)
    if explicit:
        return LibraryChoice(Path(explicit), f"{LIB_ENV}={explicit}")
    current = engines_dir(state_dir) / CURRENT
    if not current.exists():
        return LibraryChoice(None, "vendored with forged (CPU)")
    directory = current.resolve()
    record = _unfit(directory, compute_capability)
    if isinstance(record, str):  # why it does not fit
        log.warning("not using the engine in %s: %s", directory, record)
        return LibraryChoice(None, "vendored with forged (CPU)", notes=(f"{directory}: {record}",))
    env[LIB_ENV] = str(directory / "lib")
    return LibraryChoice(directory / "lib", f"built by forgectl engine build ({directory.name})", record)


def _unfit(directory: Path, compute_capability: str | None) -> str | BuildRecord:
    """Why the built engine in `directory` cannot serve here, or its record when it can."""
    try:
        record = BuildRecord.read(directory)
    except (OSError, ValueError, TypeError) as exc:
        return f"no readable {RECORD} ({exc}); rebuild it with forgectl engine build"
    binding = binding_version()
    if record.llama_cpp_python != binding:
        return (f"it was built for llama-cpp-python {record.llama_cpp_python}, but forged binds {binding}; "
                f"rebuild it with forgectl engine build")
    if record.machine != platform.machine():
        return f"it was built for {record.machine}, this machine is {platform.machine()}"
    arch = cuda_architecture(compute_capability)
    if arch is None:
        return "the probe found no NVIDIA GPU, and a CUDA engine needs one"
    if arch != record.cuda_architecture:
        return (f"it was built for sm_{record.cuda_architecture}, but this GPU has compute capability "
                f"{compute_capability} (sm_{arch}); rebuild it with forgectl engine build")
    if not (directory / "lib" / "libllama.so").is_file():
        return "its lib/libllama.so is missing; rebuild it with forgectl engine build"
    return record


def loaded_path() -> Path | None:
    """The libllama file llama-cpp-python loaded (after `import llama_cpp`)."""
    module = sys.modules.get("llama_cpp.llama_cpp")
    lib = getattr(module, "_lib", None)
    name = getattr(lib, "_name", None)
    return Path(name) if name else None


def loaded_sibling(name: str | None = None) -> ctypes.CDLL:
    """A library in the loaded libllama's directory (`libggml.so`; None: libllama itself). libllama's
    RUNPATH is $ORIGIN, so it loaded that very file, and dlopen by its path returns the same library:
    the same ggml backend registry. OSError when none can be opened."""
    libllama = loaded_path()
    if libllama is None:
        raise OSError("llama_cpp has not loaded a libllama")
    return ctypes.CDLL(str(libllama if name is None else libllama.parent / name))
