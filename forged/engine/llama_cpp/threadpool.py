"""A persistent ggml CPU thread pool for the context, as llama-server attaches one.

Without one, ggml's CPU backend makes a disposable pool for every graph it computes: each
`llama_decode` starts and joins its worker threads, which on a small CPU is a measurable part of
a one-token step. llama.cpp's `common` (and so llama-server) creates a pool once, with hybrid
polling (the workers spin briefly before they sleep), and attaches it with
`llama_attach_threadpool`. llama-cpp-python binds neither call, so this module reaches them
through ctypes (the libraries beside the loaded libllama, `library.loaded_sibling`):
`ggml_threadpool_new`/`_free` from the CPU backend's registry entry (where llama.cpp's own code
finds them, whatever library holds the CPU backend), the parameters from libggml-base, the attach
call from libllama. Step thread only.

Attached only when the model's layers run on the CPU (context.py says why).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from forged.engine.llama_cpp.library import loaded_sibling

log = logging.getLogger(__name__)

GGML_MAX_N_THREADS = 512  # ggml.h, the size of ggml_threadpool_params.cpumask
GGML_BACKEND_DEVICE_TYPE_CPU = 0


class ThreadPoolParams(ctypes.Structure):
    """struct ggml_threadpool_params (ggml.h); filled by ggml_threadpool_params_init."""

    _fields_ = [("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS), ("n_threads", ctypes.c_int),
                ("prio", ctypes.c_int), ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool),
                ("paused", ctypes.c_bool)]


class CpuThreadPool:
    """One ggml thread pool of `n_threads`, attached to a context for decode and batch work alike."""

    def __init__(self, context: Any, n_threads: int) -> None:
        self._free_fn: Any = None
        self._libllama: Any = None
        self.ptr: int | None = None
        try:
            ggml, base, llama = loaded_sibling("libggml.so"), loaded_sibling("libggml-base.so"), loaded_sibling()
        except OSError as exc:
            log.warning("no persistent CPU thread pool (each step starts its threads): %s", exc)
            return
        vp = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes, ggml.ggml_backend_dev_by_type.restype = [ctypes.c_int], vp
        ggml.ggml_backend_dev_backend_reg.argtypes, ggml.ggml_backend_dev_backend_reg.restype = [vp], vp
        proc = ggml.ggml_backend_reg_get_proc_address
        proc.argtypes, proc.restype = [vp, ctypes.c_char_p], vp
        device = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
        reg = ggml.ggml_backend_dev_backend_reg(device) if device else None
        new_addr = proc(reg, b"ggml_threadpool_new") if reg else None
        free_addr = proc(reg, b"ggml_threadpool_free") if reg else None
        if not (new_addr and free_addr):
            log.warning("no persistent CPU thread pool: the CPU backend does not export ggml_threadpool_new")
            return
        new = ctypes.CFUNCTYPE(vp, ctypes.POINTER(ThreadPoolParams))(new_addr)
        self._free_fn = ctypes.CFUNCTYPE(None, vp)(free_addr)
        params = ThreadPoolParams()
        base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(ThreadPoolParams), ctypes.c_int]
        base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        self.ptr = new(ctypes.byref(params))
        if not self.ptr:
            log.warning("no persistent CPU thread pool: ggml_threadpool_new(%d threads) failed", n_threads)
            return
        llama.llama_attach_threadpool.argtypes = [vp, vp, vp]
        llama.llama_detach_threadpool.argtypes = [vp]
        # The same pool for one-token steps and prompt batches: forged runs both with one thread count.
        llama.llama_attach_threadpool(context, self.ptr, self.ptr)
        self._libllama = llama

    def free(self, context: Any) -> None:
        """Detach from the context (before it is freed) and stop the pool's threads."""
        if self.ptr is None:
            return
        if context:
            self._libllama.llama_detach_threadpool(context)
        self._free_fn(self.ptr)
        self.ptr = None
