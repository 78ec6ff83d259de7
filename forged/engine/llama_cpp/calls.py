"""The libllama calls the step loop makes for each step: decode the batch, sample a sequence (its
`sampling.Sampler`, or a plain argmax when it has none).

Test fault injection (`faults.py`) wraps this one object; nothing else replaces it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import llama_cpp as ll
import numpy as np

from forged.engine.base import EngineError
from forged.engine.llama_cpp.sampling import Sampled

if TYPE_CHECKING:
    from forged.engine.llama_cpp.scheduler import Slice
    from forged.engine.llama_cpp.sequence import Sequence


class StepCalls:
    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab

    def decode(self, ctx: Any, batch: Any, plan: list[Slice]) -> int:
        return ll.llama_decode(ctx, batch)

    def sample(self, ctx: Any, seq: Sequence, idx: int) -> Sampled:
        if seq.sampler is None:
            # Plain greedy: the argmax straight off the logits row. libllama's greedy sampler first
            # copies the whole vocabulary (262k entries for Gemma 3) into a candidates array, once
            # per sequence per step; at 20 streams on the H200 that held decode to 0.72x
            # llama-server's (now 2.6x).
            logits = ll.llama_get_logits_ith(ctx, idx)
            if not logits:
                raise EngineError(f"libllama has no logits for batch position {idx}")
            return Sampled(int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax()))
        return seq.sampler.sample(ctx, idx)
