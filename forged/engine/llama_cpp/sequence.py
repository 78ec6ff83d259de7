"""One running generation inside the embedded engine: its tokens, its KV slot and its output state.

A request with n choices (OpenAI's `n`) is n sequences that share its request, event queue and
arrival. It starts as one, its choice 0, carrying `forks = n - 1`; when that one's prompt is
prefilled the step loop forks it (`KvPool.fork`): each other choice gets a slot holding the same
prompt KV and its own sampler, and samples its first token from the same logits row.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from forged.engine.base import GenerationRequest, TokenEvent
from forged.engine.llama_cpp.kvpool import Slot, blocks_for
from forged.engine.text import StopMatcher, StreamDecoder

if TYPE_CHECKING:
    from forged.engine.llama_cpp.sampling import Sampler  # libllama: imported by the step loop only


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    events: asyncio.Queue[TokenEvent]
    arrival: int  # order of arrival in the engine; smaller is older
    sampler: Sampler | None  # None: a plain greedy argmax (calls.StepCalls.sample)
    stop: StopMatcher
    index: int = 0  # which choice of its request (TokenEvent.index)
    forks: int = 0  # choices still to fork from this one once its prompt is prefilled
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    generated: list[int] = field(default_factory=list)
    # Tokens to feed before decoding: the prompt, or after a preemption the prompt and everything
    # generated so far. `prefilled` of them are in the slot's KV (found cached, or computed).
    to_prefill: list[int] = field(default_factory=list)
    prefilled: int = 0
    pending_token: int | None = None  # sampled, streamed, not yet fed back
    slot: Slot | None = None
    # Prompt tokens found cached when the request first started (usage.prompt_tokens_details).
    cached_tokens: int | None = None
    # The step holding its first prompt chunk began then, with the engine's prefill count then.
    prefill_started: float = 0.0
    prefill_mark: int = 0
    preempted: int = 0

    def __post_init__(self) -> None:
        if not self.to_prefill:
            self.to_prefill = list(self.request.prompt_tokens)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def width(self) -> int:
        """The sequences it needs at once: itself and the choices it will fork."""
        return 1 + self.forks

    @property
    def n_past(self) -> int:
        """Tokens of this sequence whose KV its slot holds."""
        return len(self.slot.tokens) if self.slot is not None else 0

    @property
    def prefill_remaining(self) -> int:
        return len(self.to_prefill) - self.prefilled

    @property
    def decoding(self) -> bool:
        return self.pending_token is not None

    def reserve_tokens(self, policy: str, paged: bool, context: int) -> int:
        return reserve_tokens(len(self.request.prompt_tokens), len(self.to_prefill),
                              self.request.sampling.max_tokens, policy, paged, context)

    def resume_after_preemption(self) -> None:
        """Back to the waiting line: recompute prompt + all generated (none of it streams again)."""
        self.to_prefill = list(self.request.prompt_tokens) + self.generated
        self.prefilled = 0
        self.pending_token = None
        self.slot = None
        self.preempted += 1


def reserve_tokens(prompt: int, to_prefill: int, max_tokens: int, policy: str, paged: bool, context: int) -> int:
    """The KV a sequence needs reserved when it starts: a whole context without paging, prompt +
    max_tokens under guaranteed_no_evict, what it prefills and one token more otherwise."""
    if not paged:
        return context
    if policy == "guaranteed_no_evict":
        return prompt + max_tokens
    return to_prefill + 1


def choice_blocks(prompt: int, reserve: int, n: int, tokens_per_block: int, shares_prompt: bool) -> int:
    """The blocks a request of n choices reserves: the first choice's whole reservation, and each
    other choice's less the prompt's whole blocks, when the pool shares those cells between them
    (unified pool with the prefix cache on: the forks hold the first choice's indexed blocks)."""
    own = blocks_for(reserve, tokens_per_block)
    shared = prompt // tokens_per_block if shares_prompt else 0
    return own + (n - 1) * max(own - shared, 0)
