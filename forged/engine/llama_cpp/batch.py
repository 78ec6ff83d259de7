"""A `llama_batch` whose arrays are numpy buffers, filled a slice at a time.

`llama_batch_init` hands back C arrays that Python can only fill one element per ctypes call: for
an 8k-token prefill chunk that is tens of thousands of calls per step, on the step loop's hot
path. Here the arrays belong to numpy, so a chunk is four slice assignments; each token's
`seq_id` pointer is wired once to its own slot in one int32 array. forged owns the memory, so the
batch is never passed to `llama_batch_free`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp as ll
import numpy as np


class StepBatch:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        seq_ptrs = (ctypes.POINTER(ll.llama_seq_id) * capacity)()
        base = self.seq.ctypes.data
        for i in range(capacity):
            seq_ptrs[i] = ctypes.cast(base + 4 * i, ctypes.POINTER(ll.llama_seq_id))
        self._seq_ptrs = seq_ptrs  # keep the pointer array alive as long as the batch
        self.struct = ll.llama_batch()
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(ll.llama_token))
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(ll.llama_pos))
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(seq_ptrs, ctypes.POINTER(ctypes.POINTER(ll.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: Sequence[int], first_pos: int, seq_id: int, want_last_logits: bool) -> int:
        """Append one sequence's tokens at consecutive positions; returns the last token's index."""
        k = len(tokens)
        start, end = self.n, self.n + k
        if end > self.capacity:
            raise ValueError(f"batch overflow: {end} > {self.capacity}")
        self.token[start:end] = tokens
        self.pos[start:end] = np.arange(first_pos, first_pos + k, dtype=np.int32)
        self.seq[start:end] = seq_id
        self.logits[start:end] = 0
        if want_last_logits:
            self.logits[end - 1] = 1
        self.n = end
        return end - 1

    def ready(self) -> ll.llama_batch:
        self.struct.n_tokens = self.n
        return self.struct
