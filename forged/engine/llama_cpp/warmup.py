"""The warm-up before READY: a long prefill and a few decodes on the real context.

It pages the weights in, makes libllama size its compute buffers for full-size steps, and gives the
first prefill and decode rates that Retry-After and deadline admission start from.
"""

from __future__ import annotations

import time

from forged.engine.base import EngineError, Rate
from forged.engine.llama_cpp.batch import StepBatch
from forged.engine.llama_cpp.context import LlamaContext
from forged.engine.llama_cpp.model import LlamaModel

# The timed prefill: a prompt as long as the serving context (attention grows with it), but never
# more than 16 chunks or about a second, so that READY is not held up on a slow box.
WARM_UP_MAX_CHUNKS = 16
WARM_UP_BUDGET_S = 1.0


def warm_up(llama: LlamaModel, context: LlamaContext, batch: StepBatch, chunk: int,
            serving_context: int) -> tuple[Rate, Rate]:
    """Returns the measured (prefill, decode) rates.

    The timed prefill is one long prompt in `chunk`-token steps (up to the serving context,
    WARM_UP_MAX_CHUNKS or WARM_UP_BUDGET_S), because a prompt's rate falls as its context grows:
    timed on one short chunk, or on half the context, the H200 looked 20-40% faster than it is on
    20k-token prompts, and deadline admission let in requests that then missed the target.
    """
    text = "The quick brown fox jumps over the lazy dog. " * 64
    sample = llama.tokenize(text, add_special=True, parse_special=False)
    chunk = min(chunk, serving_context // 2)
    length = max(chunk, min(serving_context - 8, WARM_UP_MAX_CHUNKS * chunk))
    tokens = (sample * (length // len(sample) + 1))[:length]
    prefill_rate, decode_rate = Rate(), Rate()

    def decode() -> None:
        if context.decode(batch.ready()) != 0:
            raise EngineError("the warm-up step failed in llama_decode")

    def prefill(n_tokens: int, rate: Rate) -> int:
        context.seq_rm(0, -1, -1)
        started, done = time.monotonic(), 0
        while done < n_tokens and (done == 0 or time.monotonic() - started < WARM_UP_BUDGET_S):
            part = tokens[done: min(done + chunk, n_tokens)]
            batch.clear()
            batch.add(part, done, 0, want_last_logits=True)
            decode()
            done += len(part)
        rate.add(done, time.monotonic() - started)
        return done

    prefill(min(chunk, 512), Rate())  # pays for page faults and kernel selection; not counted
    n = prefill(length, prefill_rate)
    for step in range(4):
        batch.clear()
        batch.add(tokens[step:step + 1], n + step, 0, want_last_logits=True)
        started = time.monotonic()
        decode()
        decode_rate.add(1, time.monotonic() - started)
    context.seq_rm(0, -1, -1)
    return prefill_rate, decode_rate
