"""Step planning (chunked context)."""

from __future__ import annotations

from dataclasses import dataclass

from forged.engine.llama_cpp.scheduler import plan_step


@dataclass(eq=False)
class Seq:
    arrival: int
    remaining: int = 0

    @property
    def prefill_remaining(self) -> int:
        return self.remaining


def test_decodes_first_then_prefill_chunks_oldest_first() -> None:
    running = [Seq(1), Seq(2), Seq(3), Seq(4)]
    long_prompt, later = Seq(5, 4000), Seq(6, 100)
    plan = plan_step(running, [later, long_prompt], max_num_tokens=256, chunked=True)
    assert [(s.seq.arrival, s.n_tokens, s.is_decode) for s in plan] == [
        (1, 1, True), (2, 1, True), (3, 1, True), (4, 1, True), (5, 252, False)]
    assert sum(s.n_tokens for s in plan) == 256


def test_budget_shared_across_prompts() -> None:
    plan = plan_step([], [Seq(1, 100), Seq(2, 300)], max_num_tokens=256, chunked=True)
    assert [(s.seq.arrival, s.n_tokens) for s in plan] == [(1, 100), (2, 156)]


def test_unchunked_prompt_goes_whole_or_waits_in_order() -> None:
    plan = plan_step([Seq(1)], [Seq(2, 200), Seq(3, 10)], max_num_tokens=256, chunked=False)
    assert [(s.seq.arrival, s.n_tokens) for s in plan] == [(1, 1), (2, 200), (3, 10)]
    plan = plan_step([Seq(1)], [Seq(2, 300), Seq(3, 10)], max_num_tokens=256, chunked=False)
    assert [(s.seq.arrival, s.n_tokens) for s in plan] == [(1, 1)]
