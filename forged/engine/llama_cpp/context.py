"""The libllama context: KV cache, batch size and threads, and the KV sequence calls on it.

`LlamaContext` is the one place forged creates a `llama_context` and calls `llama_memory_seq_*` on
it; the KV pool (`kvpool.py`) drives it through the `KvMemory` calls. Step thread only, once the
engine runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import Any

import llama_cpp as ll

from forged.config import Profile
from forged.engine.base import EngineError
from forged.engine.kv import KV_DTYPE_TO_GGML
from forged.engine.llama_cpp.model import LlamaModel
from forged.engine.llama_cpp.sizing import KvSizing
from forged.engine.llama_cpp.threadpool import CpuThreadPool

log = logging.getLogger(__name__)


class LlamaContext:
    def __init__(self, model: LlamaModel, profile: Profile, kv: KvSizing, n_batch: int, n_ubatch: int,
                 n_gpu_layers: int) -> None:
        opts, levers = profile.llama_cpp, profile.tensorrt_llm
        kv_name, kv_type = KV_DTYPE_TO_GGML[levers.kv_cache_dtype]
        cores = len(os.sched_getaffinity(0))
        threads = opts.n_threads or cores
        if threads > cores:
            # Measured on a 2-core box: 3 threads made three small decodes take 9 s instead of 0.05 s.
            log.warning("llama_cpp.n_threads is %d, more than the %d cores forged may run on: ggml's threads wait "
                        "for each other by spinning, so each step can take many times longer; set it to at most "
                        "%d, or 0 (every core)", threads, cores, cores)
        params = ll.llama_context_default_params()
        params.n_ctx = kv.n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch
        params.n_seq_max = kv.n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = kv_type
        params.type_v = kv_type
        params.kv_unified = kv.unified
        params.swa_full = False
        params.no_perf = True
        # A quantized V cache needs flash attention in libllama.
        params.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if kv_name == "q8_0"
                                  else ll.LLAMA_FLASH_ATTN_TYPE_AUTO)
        ptr = ll.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise EngineError(f"libllama could not create a context of {kv.n_ctx} KV cells ({kv_name} KV) "
                              f"for {model.path}")
        self.ptr = ptr
        self.memory = ll.llama_get_memory(ptr)
        # Only where the layers run on the CPU: the pool's workers spin for a while after each graph
        # (ggml's hybrid polling), which on a GPU box would keep every core busy beside the GPU for the
        # few CPU ops of a step, and forged's GPU figures were measured without it.
        self.thread_pool = CpuThreadPool(ptr, threads) if n_gpu_layers == 0 else None
        self.kv_type_name = kv_name
        self.params: dict[str, Any] = {
            "n_ctx": kv.n_ctx, "n_batch": n_batch, "n_ubatch": n_ubatch, "n_seq_max": kv.n_seq_max,
            "n_threads": threads, "type_k": kv_name, "type_v": kv_name, "kv_unified": kv.unified,
            "swa_full": False, "flash_attn_type": int(params.flash_attn_type), "n_gpu_layers": n_gpu_layers,
        }

    def free(self) -> None:
        if self.ptr:
            if self.thread_pool is not None:
                self.thread_pool.free(self.ptr)
            ll.llama_free(self.ptr)
            self.ptr = None

    def decode(self, batch: ll.llama_batch) -> int:
        return ll.llama_decode(self.ptr, batch)

    # ------------------------------------------------------------ KvMemory

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        ll.llama_memory_seq_rm(self.memory, seq_id, p0, p1)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        ll.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_pos_min(self, seq_id: int) -> int:
        return ll.llama_memory_seq_pos_min(self.memory, seq_id)

    # ------------------------------------------------------------ host copies of one sequence

    def save_seq(self, seq_id: int) -> bytes:
        """A sequence's KV as bytes in host memory (`llama_state_seq_get_data`)."""
        size = ll.llama_state_seq_get_size(self.ptr, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = ll.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        if written != size:
            raise EngineError(f"libllama saved {written} of {size} bytes of sequence {seq_id}")
        return bytes(buf)

    def restore_seq(self, seq_id: int, data: bytes) -> bool:
        """Load a saved sequence's KV into `seq_id` (whose cells must be empty)."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return ll.llama_state_seq_set_data(self.ptr, buf, len(data), seq_id) == len(data)
