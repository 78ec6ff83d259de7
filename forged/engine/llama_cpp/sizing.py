"""How big the libllama KV cache is, and how many sequences it holds: from the model's real shape,
the profile's levers and the memory free on the device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forged.engine.base import EngineError
from forged.engine.kv import LLAMA_CPP_DTYPE_BYTES, KvShape, blocks_for, kv_budget_bytes

# libllama's ceiling on sequence ids in one context (LLAMA_MAX_SEQ).
MAX_SEQ = 256


@dataclass(frozen=True)
class KvSizing:
    num_blocks: int
    tokens_per_block: int
    cache_bytes: float  # what libllama allocates for this cache: full layers plus the sliding-window part
    budget_bytes: float
    limited_by: str
    sessions: int  # sequences that can run at once
    unified: bool
    # libllama sequence ids: one per session, and in the unified pool as many again for idle holders
    # of cached prefixes (streams: one per stream, and streams = sessions).
    n_seq_max: int

    @property
    def n_ctx(self) -> int:
        return self.num_blocks * self.tokens_per_block

    @property
    def stream_blocks(self) -> int:
        """Blocks of one stream (streams layout)."""
        return self.num_blocks // self.n_seq_max


def cache_holders(sessions: int) -> int:
    """Extra sequence ids the unified pool keeps for finished sequences' cached KV."""
    return min(max(sessions, 4), MAX_SEQ - sessions)


def size_kv_cache(shape: KvShape, levers: Any, *, sessions: int, context: int, n_ubatch: int,
                  available_bytes: int, unified: bool = True) -> KvSizing:
    """The budget is `free_gpu_memory_fraction` of the device memory left once the weights are in
    (MemAvailable on CPU and unified-memory machines). Sliding-window layers keep a fixed-size cache
    (libllama: window x sequences + one ubatch), which comes off the budget first.

    Unified: one pool; the rest of the budget buys blocks of full-attention cells, capped by every
    session at a full context (more could never be in use at once) and by `kv_cache_max_tokens`.
    Less than one full context refuses to start. Streams: each sequence owns a stream of one full
    context, so the budget decides how many sequences (sessions) fit.
    """
    tpb = levers.tokens_per_block
    context_blocks = blocks_for(context, tpb)
    cell_bytes = shape.elements_per_token_per_layer() * LLAMA_CPP_DTYPE_BYTES[levers.kv_cache_dtype]
    budget = kv_budget_bytes(available_bytes, shape.weights_bytes, levers.free_gpu_memory_fraction)

    def swa_bytes(n_seq: int) -> float:
        if not shape.swa_layers:
            return 0.0
        cells = min(-(-(shape.sliding_window * n_seq + n_ubatch) // 256) * 256, n_seq * context_blocks * tpb)
        return shape.swa_layers * cells * cell_bytes

    if not unified:
        stream = shape.full_layers * context_blocks * tpb * cell_bytes + swa_bytes(1)
        caps = {"max_concurrent_sessions": sessions,
                "free_gpu_memory_fraction of free memory": int(budget // stream) if stream else sessions}
        if levers.kv_cache_max_tokens:
            caps["kv_cache_max_tokens"] = levers.kv_cache_max_tokens // (context_blocks * tpb)
        limited_by, fit = min(caps.items(), key=lambda kv: kv[1])
        if fit < 1:
            raise EngineError(f"one session's KV stream of {context} tokens does not fit ({limited_by}); lower "
                              f"inference.max_seq_len or give the KV cache more memory")
        fit = min(fit, MAX_SEQ)
        return KvSizing(fit * context_blocks, tpb, shape.full_layers * fit * context_blocks * tpb * cell_bytes
                        + swa_bytes(fit), budget, limited_by, fit, unified=False, n_seq_max=fit)
    n_seq_max = sessions + cache_holders(sessions)
    caps = {"every session at a full context": sessions * context_blocks}
    if shape.full_layers:
        caps["free_gpu_memory_fraction of free memory"] = int(max(budget - swa_bytes(n_seq_max), 0)
                                                              // (shape.full_layers * cell_bytes * tpb))
    if levers.kv_cache_max_tokens:
        caps["kv_cache_max_tokens"] = levers.kv_cache_max_tokens // tpb
    limited_by, num_blocks = min(caps.items(), key=lambda kv: kv[1])
    if num_blocks < context_blocks:
        raise EngineError(f"the KV cache can hold {num_blocks * tpb} tokens ({limited_by}), less than one "
                          f"context of {context} tokens; lower inference.max_seq_len or give the KV cache "
                          f"more memory")
    cache = shape.full_layers * num_blocks * tpb * cell_bytes + swa_bytes(n_seq_max)
    return KvSizing(num_blocks, tpb, cache, budget, limited_by, sessions, unified=True, n_seq_max=n_seq_max)
