"""The persistent ggml thread pool that forged attaches to its libllama context."""

from __future__ import annotations

import os
from pathlib import Path

import llama_cpp as ll

from forged.config import LlamaCppOptions, Profile
from forged.engine.llama_cpp.batch import StepBatch
from forged.engine.llama_cpp.context import LlamaContext
from forged.engine.llama_cpp.model import LlamaModel
from forged.engine.llama_cpp.sizing import KvSizing


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_context_runs_on_one_attached_pool_of_its_threads(model_path: Path) -> None:
    llama = LlamaModel(model_path, n_gpu_layers=0)
    n = min(2, len(os.sched_getaffinity(0)))  # more threads than cores would spin against each other
    before = _threads()
    sizing = KvSizing(num_blocks=16, tokens_per_block=16, cache_bytes=0, budget_bytes=0, limited_by="test",
                      sessions=2, unified=False, n_seq_max=2)
    context = LlamaContext(llama, Profile(llama_cpp=LlamaCppOptions(n_threads=n)), sizing, n_batch=64, n_ubatch=64,
                           n_gpu_layers=0)
    try:
        pool = context.thread_pool
        assert pool is not None and pool.ptr, "no ggml thread pool was attached"
        # The calling thread is the pool's first: n - 1 workers wait between steps, and no step starts more.
        assert _threads() == before + n - 1
        batch = StepBatch(64)
        for step in range(3):  # a prompt batch, then one-token steps: both run on the pool
            tokens = (1, 2, 3, 4) if step == 0 else (5 + step,)
            batch.clear()
            batch.add(tokens, 0 if step == 0 else 3 + step, 0, want_last_logits=True)
            assert context.decode(batch.ready()) == 0
        assert ll.llama_memory_seq_pos_max(context.memory, 0) == 5
        assert _threads() == before + n - 1
    finally:
        context.free()
        llama.free()
    assert context.thread_pool is not None and context.thread_pool.ptr is None  # detached and stopped with the context
    assert _threads() == before


def test_no_pool_when_the_layers_are_offloaded(model_path: Path) -> None:
    # The pool's workers spin after every graph; beside a GPU that would keep the cores busy for the
    # step's few CPU operations. Offloaded engines keep ggml's own per-graph threads.
    llama = LlamaModel(model_path, n_gpu_layers=0)
    sizing = KvSizing(num_blocks=16, tokens_per_block=16, cache_bytes=0, budget_bytes=0, limited_by="test",
                      sessions=1, unified=False, n_seq_max=1)
    context = LlamaContext(llama, Profile(llama_cpp=LlamaCppOptions(n_threads=1)), sizing, n_batch=64, n_ubatch=64,
                           n_gpu_layers=-1)
    try:
        assert context.thread_pool is None
    finally:
        context.free()
        llama.free()
