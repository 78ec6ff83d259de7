"""What TensorRT-LLM is refused before it loads: its package and version, the machine, the checkpoint.

- **Package.** `missing_package` answers without importing `tensorrt_llm` (that takes seconds).
- **Version.** 1.0 to 1.2; another is refused naming the version and how to install a supported one.
- **Hardware.** fp8 KV needs compute capability 8.9 or later; Jetson (Thor is SM110) is not
  supported by 1.0-1.2; the KV cache is always paged; `max_num_tokens` is a multiple of
  `tokens_per_block`.
- **Checkpoint.** `model.path` must be a Hugging Face checkpoint directory (config.json, weights,
  tokenizer); the default model is a GGUF file, which only llama_cpp reads.

A refusal is an `EngineConfigError` (a config error: exit 78, no restart loop), one line naming
file:line, the key and the reason.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forged.config import ModelSettings, Profile
from forged.hardware import HardwareInfo
from forged.schema import ConfigError

PACKAGE = "tensorrt_llm"
SUPPORTED_VERSIONS = ((1, 0), (1, 1), (1, 2))
INSTALL_HINT = ("pip install --extra-index-url https://pypi.nvidia.com 'tensorrt-llm>=1.0,<1.3' "
                "(CUDA 12.8+ driver; see docs/engines.md)")
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


def missing_package() -> bool:
    """True when the tensorrt_llm package cannot be found (without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec(PACKAGE) is None
    except (ImportError, ValueError):
        return True


class EngineConfigError(ConfigError):
    """A profile this engine cannot run as asked: one line naming file:line, the key and the reason."""


Locate = Callable[[str], str]


def refusal(profile_name: str, key: str, reason: str, where: Locate | None) -> EngineConfigError:
    path = f"profiles.{profile_name}.{key}"
    prefix = f"{where(path)}: " if where else ""
    return EngineConfigError(f"{prefix}{path}: {reason}")


# ---------------------------------------------------------------- the machine

def _parse_cc(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    major, _, minor = text.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return None


def check_hardware(profile_name: str, profile: Profile, hardware: HardwareInfo,
                   where: Locate | None = None) -> list[str]:
    """Refuse what TensorRT-LLM cannot do on this machine; return warnings for what may still fail."""
    levers = profile.tensorrt_llm
    if hardware.kind == "jetson":
        raise refusal(profile_name, "engine", f"TensorRT-LLM 1.0-1.2 does not support Jetson ({hardware.name}, "
                      f"compute capability {hardware.compute_capability or 'unknown'}; Thor is SM110); use "
                      f"engine: llama_cpp", where)
    if levers.kv_cache_dtype == "fp8":
        cc = _parse_cc(hardware.compute_capability)
        if cc is None:
            raise refusal(profile_name, "tensorrt_llm.kv_cache_dtype", f"fp8 KV cache needs an NVIDIA GPU of "
                          f"compute capability 8.9 or later (Ada, Hopper, Blackwell), and this machine has "
                          f"none ({hardware.kind}: {hardware.name}); use fp16 or bf16", where)
        if cc < FP8_MIN_COMPUTE_CAPABILITY:
            raise refusal(profile_name, "tensorrt_llm.kv_cache_dtype", f"fp8 KV cache needs compute "
                          f"capability 8.9 or later (FP8 math arrived with Ada), but {hardware.name} has "
                          f"{hardware.compute_capability}; use fp16 or bf16", where)
    if not levers.use_paged_kv_cache:
        raise refusal(profile_name, "tensorrt_llm.use_paged_kv_cache", "TensorRT-LLM's PyTorch backend "
                      "always pages the KV cache; expected true", where)
    if levers.max_num_tokens % levers.tokens_per_block:
        raise refusal(profile_name, "tensorrt_llm.max_num_tokens", f"expected a multiple of tokens_per_block "
                      f"({levers.tokens_per_block}), got {levers.max_num_tokens}", where)
    warnings = []
    if hardware.kind != "gpu":
        warnings.append(f"engine tensorrt_llm on a machine where the probe found no NVIDIA GPU ({hardware.name}); "
                        f"TensorRT-LLM needs one and will fail to load without it")
    return warnings


# ---------------------------------------------------------------- the version

def parse_version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def check_version(profile_name: str, trt: Any, where: Locate | None = None) -> str:
    """The installed TensorRT-LLM's version; refused unless forged supports it."""
    version = str(getattr(trt, "__version__", "unknown"))
    if parse_version(version) not in SUPPORTED_VERSIONS:
        raise refusal(profile_name, "engine", f"TensorRT-LLM {version} is installed; forged supports 1.0 "
                      f"to 1.2 (install one with {INSTALL_HINT})", where)
    return version


# ---------------------------------------------------------------- the checkpoint

def resolve_checkpoint(settings: ModelSettings, where: Locate | None = None) -> tuple[Path, str]:
    """model.path must be a Hugging Face checkpoint directory (config.json, weights, tokenizer)."""
    prefix = f"{where('model.path')}: " if where else ""
    if not settings.path:
        raise ConfigError(f"{prefix}model.path: engine tensorrt_llm needs a Hugging Face checkpoint directory "
                          f"(config.json, *.safetensors, tokenizer files), e.g. /var/lib/forged/models/"
                          f"Llama-3.1-8B-Instruct; the default model is a GGUF file, which only llama_cpp reads")
    path = Path(settings.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{prefix}model.path: engine tensorrt_llm needs a Hugging Face checkpoint directory "
                          f"with a config.json, and {path} is not one")
    return path, settings.name or path.name


def one_line(exc: BaseException) -> str:
    """A TensorRT-LLM exception as one line of a refusal or log message."""
    # CppExecutorError's str() appends a stack trace; its .message is what happened.
    message = getattr(exc, "message", None)
    text = " ".join((message if isinstance(message, str) and message else str(exc)).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
