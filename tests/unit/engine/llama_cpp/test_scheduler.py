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


def test_a_short_remainder_goes_ahead_of_an_older_long_prompt_within_half_the_budget() -> None:
    # A later turn whose history was found cached needs 40 tokens; an older 4000-token prompt would
    # otherwise hold every step's budget until it is done.
    long_prompt, turn, another, too_long = Seq(5, 4000), Seq(6, 40), Seq(7, 60), Seq(8, 70)
    plan = plan_step([Seq(1)], [long_prompt, turn, another, too_long], max_num_tokens=256, chunked=True)
    # 255 tokens of prefill budget: the short ones may take 127; 70 is above a quarter of the step (64).
    assert [(s.seq.arrival, s.n_tokens) for s in plan] == [(1, 1), (6, 40), (7, 60), (5, 155)]
    many = [Seq(10 + i, 50) for i in range(4)]
    plan = plan_step([], [long_prompt, *many], max_num_tokens=256, chunked=True)
    # Only two fit the short half (128); the rest wait behind the older prompt's chunk.
    assert [(s.seq.arrival, s.n_tokens) for s in plan] == [(10, 50), (11, 50), (5, 156)]


def test_on_the_cpu_a_chunk_leaves_a_whole_flash_attention_tile_for_the_last_one() -> None:
    # 181 left, 124 free: 124 now would leave 57, a chunk that costs as much as 64. Take 117, leave 64.
    plan = plan_step([Seq(1), Seq(2), Seq(3), Seq(4)], [Seq(5, 181)], max_num_tokens=128, chunked=True, min_chunk=64)
    assert [(s.seq.arrival, s.n_tokens) for s in plan][-1] == (5, 117)
    # Without the tile rule (a GPU), the step is filled.
    plan = plan_step([Seq(1), Seq(2), Seq(3), Seq(4)], [Seq(5, 181)], max_num_tokens=128, chunked=True)
    assert [(s.seq.arrival, s.n_tokens) for s in plan][-1] == (5, 124)
    # When leaving a tile would make this chunk shorter than one, it is taken whole: nothing gained.
    plan = plan_step([], [Seq(1, 100)], max_num_tokens=60, chunked=True, min_chunk=64)
    assert [(s.seq.arrival, s.n_tokens) for s in plan] == [(1, 60)]


def test_on_the_cpu_a_younger_prompt_takes_no_sliver_but_the_oldest_always_progresses() -> None:
    # The older prompt leaves 28 tokens of the step: the younger one waits for a fuller step.
    plan = plan_step([], [Seq(1, 100), Seq(2, 4000)], max_num_tokens=128, chunked=True, min_chunk=64)
    assert [(s.seq.arrival, s.n_tokens) for s in plan] == [(1, 100)]
    # A younger prompt's last piece, however short, still goes: it finishes that prompt.
    plan = plan_step([], [Seq(1, 100), Seq(2, 20)], max_num_tokens=128, chunked=True, min_chunk=64)
    assert [(s.seq.arrival, s.n_tokens) for s in plan] == [(2, 20), (1, 100)]
    # A budget smaller than a tile (many decodes, or a small max_num_tokens): the oldest still moves.
    plan = plan_step([Seq(k) for k in range(1, 121)], [Seq(200, 4000), Seq(201, 4000)], max_num_tokens=128,
                     chunked=True, min_chunk=64)
    assert [(s.seq.arrival, s.n_tokens) for s in plan if not s.is_decode] == [(200, 8)]
