"""What goes into one engine step: decodes first, then prefill chunks in arrival order.

This is the "chunked context" lever. A step holds at most `max_num_tokens` tokens. Every running
sequence that has finished its prefill contributes exactly one decode token; the rest of the budget
is given to prefilling sequences, oldest first, each taking as much as it still needs. With chunking
off, a prompt is only scheduled whole (admission refuses prompts longer than the budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Schedulable(Protocol):
    arrival: int  # admission order; smaller is older

    @property
    def prefill_remaining(self) -> int: ...


@dataclass(frozen=True)
class Slice:
    seq: Schedulable
    n_tokens: int  # 1 for a decode
    is_decode: bool


def plan_step(decoding: list[Schedulable], prefilling: list[Schedulable], max_num_tokens: int,
              chunked: bool) -> list[Slice]:
    plan = [Slice(s, 1, True) for s in decoding[:max_num_tokens]]
    budget = max_num_tokens - len(plan)
    for seq in sorted(prefilling, key=lambda s: s.arrival):
        if budget <= 0:
            break
        need = seq.prefill_remaining
        if need <= 0:
            continue
        if chunked:
            take = min(need, budget)
        elif need <= budget:
            take = need
        else:
            # Unchunked: a prompt goes in whole or waits; it must not be overtaken (FCFS).
            break
        plan.append(Slice(seq, take, False))
        budget -= take
    return plan
