"""Engine selection: the profile's `engine` picks the implementation of the contract in `base.py`.

`create_engine` is the one place that decides which engine runs and which model file it gets, and
it does so before any listener opens, so that every refusal is one line at startup:

- `llama_cpp`: the GGUF model (`model.path`, or the default model), its magic checked; the libllama
  to load (`llama_cpp/library.py`: an engine built by `forgectl engine build`, or the vendored CPU
  one) and what it can run on (`llama_cpp/backends.py`). A profile that wants GPU layers on a machine
  with a GPU and a library without one refuses to start, unless `llama_cpp.allow_cpu_fallback: true`
  (then the KV is sized from host memory and `gpu_unused` says why).
- `tensorrt_llm`: the hardware checks (`trtllm.check_hardware`) and a Hugging Face checkpoint
  directory in `model.path`. When the `tensorrt_llm` package is not installed the profile either
  refuses to start (one line: the package, how to install it) or, with `engine_fallback: true`,
  runs `llama_cpp` instead and says so (log, `/v1/status` engine.fallback).

Engine modules are imported here on demand: a machine with only one engine installed never imports
the other (libllama, or TensorRT-LLM and torch).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forged.config import LoadedConfig, ModelSettings, Profile
from forged.engine.base import Engine
from forged.engine.model_files import check_gguf, resolve_model
from forged.gpus import Placement, place
from forged.hardware import HardwareInfo, system_memory
from forged.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass
class EngineChoice:
    engine: Engine
    # Which GPUs it uses and how the model is spread over them (forged.gpus).
    placement: Placement
    # Why the engine running is not the one the profile names (engine_fallback); None when it is.
    note: str | None = None
    # Set when the machine has a GPU that the engine does not use (llama_cpp.allow_cpu_fallback), and
    # why; the engine's memory is then the host's.
    gpu_unused: str | None = None


def create_engine(loaded: LoadedConfig, profile_name: str, profile: Profile, hardware: HardwareInfo,
                  state_dir: Path) -> EngineChoice:
    """The engine the profile asks for, not loaded yet, and where it puts the model. Raises
    ConfigError or EngineError (one line)."""
    settings = loaded.settings.model
    note = None
    if profile.engine == "tensorrt_llm":
        from forged.engine import trtllm

        if not trtllm.missing_package():
            model_dir, name = trtllm.resolve_checkpoint(settings, loaded.settings_source.where)
            placement = place(profile_name, profile, "tensorrt_llm", hardware, loaded.profiles_source)
            return EngineChoice(trtllm.TrtLlmEngine(profile_name, profile, model_dir, name, hardware,
                                                    where=loaded.profiles_source.where), placement)
        key = f"profiles.{profile_name}.engine"
        if not profile.engine_fallback:
            raise ConfigError(f"{loaded.profiles_source.where(key)}: {key}: engine tensorrt_llm needs the Python "
                              f"package {trtllm.PACKAGE}, which is not installed; install it with "
                              f"{trtllm.INSTALL_HINT}, or set engine_fallback: true in this profile to run "
                              f"llama_cpp instead")
        note = (f"profile {profile_name} asks for engine tensorrt_llm, but the {trtllm.PACKAGE} package is not "
                f"installed; running llama_cpp instead (engine_fallback: true)")
        log.warning("%s", note)
        if settings.path and not Path(settings.path).is_file():
            # model.path names a checkpoint directory for TensorRT-LLM; llama_cpp reads GGUF files only.
            log.warning("model.path %s is not a GGUF file; llama_cpp serves the default model instead",
                        settings.path)
            settings = ModelSettings()
    placement = place(profile_name, profile, "llama_cpp", hardware, loaded.profiles_source)
    engine, gpu_unused = _llama_cpp(profile_name, profile, settings, hardware, state_dir, placement)
    return EngineChoice(engine, placement, note, gpu_unused)


def _llama_cpp(profile_name: str, profile: Profile, settings: ModelSettings, hardware: HardwareInfo,
               state_dir: Path, placement: Placement) -> tuple[Engine, str | None]:
    from forged.engine.llama_cpp import library as library_mod

    model_path, model_name = resolve_model(settings, state_dir)
    # The GPU the probe found (a Jetson's integrated one too), by name; None on a CPU box.
    gpu_name = None if hardware.kind == "cpu" else (hardware.gpu.name if hardware.gpu else hardware.name)
    # Before the first `import llama_cpp`, which loads the libllama that LLAMA_CPP_LIB_PATH names.
    choice = library_mod.choose(state_dir, hardware.compute_capability if gpu_name else None)
    from forged.engine.llama_cpp import backends
    from forged.engine.llama_cpp.engine import LlamaCppEngine
    from forged.engine.llama_cpp.model import init_backend

    check_gguf(model_path)  # fail before opening listeners: one line naming the file
    init_backend()
    library = backends.inspect(choice)
    backends.log_library(library)
    gpu_unused = backends.check_offload(library, profile_name=profile_name, n_gpu_layers=profile.llama_cpp.n_gpu_layers,
                                        allow_cpu_fallback=profile.llama_cpp.allow_cpu_fallback, gpu_name=gpu_name)
    # What the KV cache's devices have free, read when the engine sizes its cache (after the probe).
    available: Callable[[], int] = lambda: placement.kv_memory(hardware).available_bytes  # noqa: E731
    if gpu_unused:
        log.warning("%s", gpu_unused)
        # The KV cache and the weights live in host RAM: size them from it, not from the idle GPU.
        available = lambda: system_memory().available_bytes  # noqa: E731
    # The host-RAM tier of the prefix cache only pays where the KV lives in separate GPU memory.
    discrete = (hardware.kind == "gpu" and not hardware.unified_memory and profile.llama_cpp.n_gpu_layers != 0
                and not gpu_unused)
    engine = LlamaCppEngine(profile, model_path, model_name, memory_available=available, placement=placement,
                            host_tier=discrete or _test_host_tier(), library=library, gpu_unused=gpu_unused)
    return engine, gpu_unused


def _test_host_tier() -> bool:
    """Test hook (FORGED_TEST_HOOKS=1 and FORGED_TEST_HOST_TIER=1): allow the host-RAM tier on a CPU
    box, so that its real save and restore run in the integration tests."""
    return os.environ.get("FORGED_TEST_HOOKS") == "1" and os.environ.get("FORGED_TEST_HOST_TIER") == "1"
