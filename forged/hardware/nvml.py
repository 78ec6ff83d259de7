"""NVML through nvidia-ml-py (`import pynvml`), behind one small session that never raises.

Every NVML question forged asks goes through `NvmlSession.call`, which turns an `NVMLError` into an
`NvmlFailure` value carrying NVML's own words ("NVML Shared Library Not Found", "Not Supported",
...). The probe then degrades field by field: a Thor answers NOT_SUPPORTED for memory but still
gives its name, a box without the driver answers LIBRARY_NOT_FOUND at init and is probed as a CPU.

The module is injectable (`NvmlSession(module=...)`), so tests hand in a strict stand-in for
`pynvml`; the default imports the real one lazily and treats a missing package like a missing
library. The package is `nvidia-ml-py` (NVIDIA's), never the deprecated `pynvml` wrapper.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NvmlFailure:
    """Why an NVML call gave no value: NVML's message and error code (None: not an NVMLError)."""

    call: str
    message: str
    code: int | None = None

    @property
    def not_supported(self) -> bool:
        return self.code == 3  # NVML_ERROR_NOT_SUPPORTED

    @property
    def function_missing(self) -> bool:
        return self.code == 13  # NVML_ERROR_FUNCTION_NOT_FOUND: new bindings, older driver

    def __str__(self) -> str:
        code = f" (NVML error {self.code})" if self.code is not None else ""
        return f"{self.call}: {self.message}{code}"


class NvmlSession:
    """One process-wide NVML session: initialised once on first use, then kept for live reads.

    `module` is `pynvml` or a stand-in with the same functions and error classes; None imports
    `pynvml` (from nvidia-ml-py) on first use.
    """

    def __init__(self, module: Any = None) -> None:
        self._module = module
        self._lock = threading.Lock()
        self._started = False
        self.failure: NvmlFailure | None = None

    @property
    def module(self) -> Any:
        return self._module

    def start(self) -> NvmlFailure | None:
        """nvmlInit once. Returns why NVML is unusable, or None when it answers."""
        with self._lock:
            if self._started or self.failure is not None:
                return self.failure
            if self._module is None:
                try:
                    import pynvml  # nvidia-ml-py; optional: `pip install forged[nvml]`
                except ImportError as exc:
                    self.failure = NvmlFailure("import pynvml", f"nvidia-ml-py is not installed ({exc})")
                    return self.failure
                self._module = pynvml
            try:
                self._module.nvmlInit()
            except Exception as exc:  # an NVMLError, or OSError from a broken library
                self.failure = _failure("nvmlInit", exc, self._module)
                return self.failure
            self._started = True
            return None

    @property
    def ready(self) -> bool:
        return self._started

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """module.<name>(*args): the value, or an NvmlFailure instead of raising."""
        failure = self.start()
        if failure is not None:
            return failure
        fn = getattr(self._module, name, None)
        if fn is None:
            return NvmlFailure(name, "this nvidia-ml-py has no such function")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            return _failure(name, exc, self._module)

    def close(self) -> None:
        with self._lock:
            if self._started:
                try:
                    self._module.nvmlShutdown()
                except Exception as exc:
                    log.debug("nvmlShutdown: %s", exc)
                self._started = False


def _failure(call: str, exc: BaseException, module: Any) -> NvmlFailure:
    error_cls = getattr(module, "NVMLError", None)
    if error_cls is not None and isinstance(exc, error_cls):
        return NvmlFailure(call, str(exc), getattr(exc, "value", None))
    return NvmlFailure(call, f"{type(exc).__name__}: {exc}")


def failed(value: Any) -> bool:
    return isinstance(value, NvmlFailure)


_default_session: NvmlSession | None = None


def default_nvml() -> NvmlSession:
    """The process's NVML session over the real `pynvml`, started on first use and kept."""
    global _default_session
    if _default_session is None:
        _default_session = NvmlSession()
    return _default_session


# ---------------------------------------------------------------- device queries

@dataclass(frozen=True)
class DeviceMemory:
    total_bytes: int
    used_bytes: int
    reserved_bytes: int
    free_bytes: int
    # "nvml v2" (used excludes driver-reserved memory, as nvidia-smi shows it) or "nvml v1" (used
    # includes it; only when this driver or nvidia-ml-py has no v2).
    source: str


def device_memory(session: NvmlSession, handle: Any) -> DeviceMemory | NvmlFailure:
    """Memory of one device: nvmlMemory_v2 when this driver and binding have it, else v1."""
    module = session.module
    version = getattr(module, "nvmlMemory_v2", None)
    if version is not None:
        m = session.call("nvmlDeviceGetMemoryInfo", handle, version=version)
        if not failed(m):
            return DeviceMemory(int(m.total), int(m.used), int(m.reserved), int(m.free), "nvml v2")
        if not m.function_missing:
            return m  # NOT_SUPPORTED (Thor, GB10), NO_PERMISSION, ...: v1 would say the same
    m = session.call("nvmlDeviceGetMemoryInfo", handle)
    if failed(m):
        return m
    return DeviceMemory(int(m.total), int(m.used), 0, int(m.free), "nvml v1")


def cuda_version_text(value: int) -> str:
    """nvmlSystemGetCudaDriverVersion's 13000 -> '13.0' (major*1000 + minor*10)."""
    return f"{value // 1000}.{(value % 1000) // 10}"
