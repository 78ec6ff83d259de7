"""Step planning (chunked context) and KV block accounting."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from forged.engine.llama_cpp.blocks import BlockAllocator, blocks_for
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


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 32) for n in (1, 32, 33, 64, 65)] == [1, 1, 2, 2, 3]


def test_allocator_reserves_grows_and_refuses() -> None:
    alloc = BlockAllocator(num_blocks=4, tokens_per_block=32)
    assert alloc.try_reserve("a", 2)
    assert alloc.ensure_tokens("a", 64)  # already covered
    assert alloc.ensure_tokens("a", 65) and alloc.owned("a") == 3
    assert not alloc.try_reserve("b", 2)
    assert alloc.used == 3 and alloc.free == 1
    assert alloc.release("a") == 3 and alloc.used == 0
    assert alloc.release("a") == 0


def test_allocator_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BlockAllocator(0, 32)


def test_release_to_hands_the_blocks_over_atomically() -> None:
    alloc = BlockAllocator(num_blocks=4, tokens_per_block=32)
    assert alloc.try_reserve("old", 2) and alloc.try_reserve("young", 2)
    assert not alloc.ensure_tokens("old", 65)  # old needs a third block; none free
    assert alloc.release_to("young", "old", 65) == 2
    assert alloc.owned("old") == 3 and alloc.owned("young") == 0 and alloc.free == 1
