"""Who runs, and what goes into each engine step.

`Scheduler` owns the engine's sequences and its KV pool, in the step thread. Sequences arrive in
`waiting` (FCFS; a preempted one goes back to its head) and start when the pool can place them,
found-cached prefix and all; then they are `running`. Each step is planned by `plan_step`: decodes
first, then prefill chunks in arrival order. This is the "chunked context" lever: a step holds at most
`max_num_tokens` tokens; every sequence past its prefill contributes one decode token, the rest of
the budget goes to prefilling sequences: first short remainders the step can finish (within half of
the budget), then oldest first. On the CPU, chunks keep to ggml's flash-attention tile
(`Policy.min_chunk`): a chunk that does not finish its prompt leaves a whole tile for the last one,
and a younger prompt does not take a sliver of what an older one left. With chunking off a prompt
is only scheduled whole (admission refuses prompts longer than the budget). When no sequence is
decoding there is no stream to keep smooth, and a step may take a whole ubatch of prompt.

Before a step runs, every sequence in it must own KV blocks for what it writes. Under
guaranteed_no_evict the reservation made at its start covers it; under max_utilization blocks are
taken as needed, cached blocks evicted first, and when that is not enough the youngest running
sequence is preempted: its KV stays behind as cache, and it waits at the head of the line to resume.

A request of n choices starts as one sequence that forks the others once its prompt is prefilled
(sequence.py). It starts only when the pool has room for all n, and until it forks, what its forks
will need stays reserved: no later sequence starts on it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from forged.engine.llama_cpp.kvpool import KvPool, blocks_for
from forged.engine.llama_cpp.sequence import Sequence, choice_blocks


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
              chunked: bool, min_chunk: int = 1) -> list[Slice]:
    plan = [Slice(s, 1, True) for s in decoding[:max_num_tokens]]
    budget = max_num_tokens - len(plan)
    oldest_first = sorted(prefilling, key=lambda s: s.arrival)
    if chunked:
        # A prefill this step can finish, up to a quarter of the step (a later turn's new message once
        # the prefix cache found the history), goes ahead of older long prompts' chunks, within half
        # of the budget: its first token comes a whole long prefill sooner, and the long prompts still
        # get at least half of every step.
        short_budget = budget // 2
        for seq in oldest_first:
            need = seq.prefill_remaining
            if 0 < need <= min(max_num_tokens // 4, short_budget):
                plan.append(Slice(seq, need, False))
                short_budget -= need
                budget -= need
        oldest_first = [s for s in oldest_first if all(sl.seq is not s for sl in plan)]
    for position, seq in enumerate(oldest_first):
        if budget <= 0:
            break
        need = seq.prefill_remaining
        if need <= 0:
            continue
        if chunked:
            take = _chunk(need, budget, min_chunk)
            if take < min(need, min_chunk) and position > 0:
                continue  # a sliver beside an older prompt's chunk: it waits for a fuller step
        elif need <= budget:
            take = need
        else:
            # Unchunked: a prompt goes in whole or waits; it must not be overtaken (FCFS).
            break
        plan.append(Slice(seq, take, False))
        budget -= take
    return plan


# Policy.min_chunk on the CPU: GGML_FA_TILE_Q (64) in ggml-cpu/common.h of the pinned llama.cpp, and
# one more. With one KV stream per sequence, libllama's equal split puts one token of a chunk in the
# decodes' ubatch when its stream's id follows theirs, and computes the rest as a ubatch of its own.
CPU_MIN_CHUNK = 64 + 1


def _chunk(need: int, budget: int, min_chunk: int) -> int:
    """How much of a prompt with `need` tokens left to take into a step with `budget` tokens free.

    A chunk that does not finish its prompt leaves at least `min_chunk` tokens for the last one, when
    it can do so and stay `min_chunk` long itself: a chunk shorter than that may cost as much as one
    of `min_chunk` tokens (Policy.min_chunk)."""
    take = min(need, budget)
    left = need - take
    if 0 < left < min_chunk and take - (min_chunk - left) >= min_chunk:
        take -= min_chunk - left
    return take


@dataclass(frozen=True)
class Policy:
    scheduler_policy: str  # guaranteed_no_evict | max_utilization
    paged: bool
    chunked: bool
    max_num_tokens: int
    idle_max_num_tokens: int  # a step's budget when nothing decodes
    context: int
    # The shortest efficient prefill chunk. ggml's CPU flash attention computes fewer than 64 query
    # tokens of a sequence one row at a time, at twice the cost per token of its tiled path (64 and
    # up; SmolLM2 at 3.5k tokens of context: 63 tokens 1.35 s, 64 tokens 0.70 s). On a GPU: 1.
    min_chunk: int = 1


class Scheduler:
    def __init__(self, pool: KvPool, policy: Policy, on_preempted: Callable[[Sequence], None],
                 on_unplaceable: Callable[[Sequence], None]) -> None:
        self.pool = pool
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._on_preempted = on_preempted
        self._on_unplaceable = on_unplaceable

    # ------------------------------------------------------------ arrivals and departures

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        """Take a sequence out, waiting or running (its slot turns idle, its KV cached)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence, trusted: bool = True) -> None:
        """A running sequence is done: its slot turns idle (cached), or is forgotten when its KV
        cannot be trusted (a failed decode)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            (self.pool.release if trusted else self.pool.discard)(seq.slot)
            seq.slot = None

    # ------------------------------------------------------------ starting

    def reserve_tokens(self, seq: Sequence) -> int:
        p = self.policy
        return seq.reserve_tokens(p.scheduler_policy, p.paged, p.context)

    def blocks_to_start(self, seq: Sequence) -> int:
        """Its own reservation, and its forks' (sequence.choice_blocks)."""
        return choice_blocks(len(seq.request.prompt_tokens), self.reserve_tokens(seq), seq.width, self.pool.tpb,
                             self.pool.shares_cells and self.pool.caching)

    def reserved_for_forks(self) -> tuple[int, int]:
        """(blocks, slots) that running sequences' forks-to-be will take: kept from later starts."""
        blocks = slots = 0
        for seq in self.running:
            if seq.forks:
                blocks += self.blocks_to_start(seq) - blocks_for(self.reserve_tokens(seq), self.pool.tpb)
                slots += seq.forks
        return blocks, slots

    def start_waiting(self) -> list[Sequence]:
        """Start waiting sequences, oldest first, while the pool can place them. A head that does not
        fit holds the line (FCFS). Returns the sequences started."""
        started: list[Sequence] = []
        while self.waiting:
            seq = self.waiting[0]
            placement = None
            held_blocks, held_slots = self.reserved_for_forks()
            if self.pool.fits(self.blocks_to_start(seq) + held_blocks, seq.width + held_slots):
                placement = self.pool.start(seq.to_prefill, self.reserve_tokens(seq))
            if placement is None:
                if not self.running and not started:
                    # Alone, with every cached block evicted, and still no room: it never will be.
                    self.waiting.popleft()
                    self._on_unplaceable(seq)
                    continue
                break
            self.waiting.popleft()
            seq.slot = placement.slot
            seq.prefilled = placement.cached_tokens
            if seq.cached_tokens is None:
                seq.cached_tokens = placement.cached_tokens
            self.running.append(seq)
            started.append(seq)
        return started

    # ------------------------------------------------------------ planning

    def plan(self) -> list[Slice]:
        """The next step, with KV blocks secured for every sequence in it (preempting when short)."""
        while True:
            plan = self._plan()
            short = next((sl for sl in plan if not self.pool.ensure(sl.seq.slot, sl.seq.n_past + sl.n_tokens)),
                         None)
            if short is None:
                return plan
            if len(self.running) == 1:
                # Alone and short even with every cached block evicted: it can never fit.
                seq = self.running[0]
                self._on_unplaceable(seq)
                return []
            self.preempt(max(self.running, key=lambda s: s.arrival))

    def _plan(self) -> list[Slice]:
        p = self.policy
        decoding = [s for s in self.running if s.decoding]
        prefilling = [s for s in self.running if not s.decoding and s.prefill_remaining > 0]
        budget = p.max_num_tokens if decoding or not p.chunked else max(p.max_num_tokens, p.idle_max_num_tokens)
        return plan_step(decoding, prefilling, budget, p.chunked, p.min_chunk)  # type: ignore[arg-type]

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks for the others: its KV turns cached (it may find it again
        when it resumes), and it waits at the head of the line."""
        self.preemptions += 1
        self.finish(seq)
        seq.resume_after_preemption()
        self.waiting.appendleft(seq)
        self._on_preempted(seq)

    # ------------------------------------------------------------ figures

    def prefill_backlog(self) -> int:
        return sum(s.prefill_remaining for s in self.running) + sum(len(s.to_prefill) for s in self.waiting)

    def waiting_blocks(self) -> int:
        """Blocks the waiting sequences will take when they start, and the running ones' forks."""
        return sum(self.blocks_to_start(s) for s in self.waiting) + self.reserved_for_forks()[0]

    def waiting_slots(self) -> int:
        """Slots the waiting sequences will take when they start, and the running ones' forks."""
        return sum(s.width for s in self.waiting) + self.reserved_for_forks()[1]
