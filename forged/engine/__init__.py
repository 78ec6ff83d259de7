"""Engine selection: the profile's `engine` picks the implementation of the contract in `base.py`.

`create_engine` is the one place that decides which engine runs and which model file it gets, and
it does so before any listener opens, so that every refusal is one line at startup:

- `llama_cpp`: the GGUF model (`model.path`, or the default model), its magic checked.
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
from forged.gpus import Placement, place
from forged.hardware import HardwareInfo
from forged.schema import ConfigError

log = logging.getLogger(__name__)


@dataclass
class EngineChoice:
    engine: Engine
    # Which GPUs it uses and how the model is spread over them (forged.gpus).
    placement: Placement
    # Why the engine running is not the one the profile names (engine_fallback); None when it is.
    note: str | None = None


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
    # What the KV cache's devices have free, read when the engine sizes its cache (after the probe).
    available = lambda: placement.kv_memory(hardware).available_bytes  # noqa: E731
    return EngineChoice(_llama_cpp(profile, settings, state_dir, available, placement, hardware), placement, note)


def _llama_cpp(profile: Profile, settings: ModelSettings, state_dir: Path, memory_available: Callable[[], int],
               placement: Placement, hardware: HardwareInfo) -> Engine:
    from forged.engine.llama_cpp.engine import LlamaCppEngine
    from forged.engine.llama_cpp.model import check_gguf
    from forged.models import resolve_model

    model_path, model_name = resolve_model(settings, state_dir)
    check_gguf(model_path)  # fail before opening listeners: one line naming the file
    # The host-RAM tier of the prefix cache only pays where the KV lives in separate GPU memory.
    discrete = hardware.kind == "gpu" and not hardware.unified_memory and profile.llama_cpp.n_gpu_layers != 0
    return LlamaCppEngine(profile, model_path, model_name, memory_available=memory_available, placement=placement,
                          host_tier=discrete or _test_host_tier())


def _test_host_tier() -> bool:
    """Test hook (FORGED_TEST_HOOKS=1 and FORGED_TEST_HOST_TIER=1): allow the host-RAM tier on a CPU
    box, so that its real save and restore run in the integration tests."""
    return os.environ.get("FORGED_TEST_HOOKS") == "1" and os.environ.get("FORGED_TEST_HOST_TIER") == "1"
