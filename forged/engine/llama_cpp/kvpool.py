"""The KV pool: libllama's KV sequences as slots, their blocks, sharing, caching and eviction.

The engine's scheduler owns one pool, in the step thread; nothing else allocates, shares or frees
KV. A *slot* is one libllama sequence id together with the tokens whose KV its cells hold, at
positions 0..n-1. A slot is *busy* while a running sequence writes to it, else *idle*: an idle
slot's KV is the prefix cache. Blocks of `tokens_per_block` tokens are the accounting unit.

Two layouts, as the profile's `llama_cpp.kv_unified` says:

- **unified** (`UnifiedPool`): one pool of cells. libllama tags every cell with the set of sequences
  that see it, so sharing a prefix is `llama_memory_seq_cp` over its positions: no data moves, the
  cells get one more tag. A block held by several slots exists once. There are more sequence ids
  than sessions, so that finished sequences keep their KV as idle holders. Allocation evicts cached
  blocks, least recently used first, before it gives up.
- **streams** (`StreamPool`): one stream of a whole context per sequence id, and attention only ever
  reads the stream's own cells. An idle stream keeps its last sequence's KV until a new sequence
  needs the stream. A prefix held by another stream is shared by copying that whole stream inside
  libllama (across streams `seq_cp` copies full buffers only) and trimming the copy.

Every hit is exact: the prefix index matches whole blocks by their tokens, and a slot's unindexed
tail is compared token by token.

A request with several choices (`n`) prefills its prompt once and then `fork`s its slot: each other
choice gets a slot of its own holding the same KV (unified: the cells get one more tag; streams: the
whole stream is copied inside libllama at the next decode, as for a shared prefix).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from forged.engine.kv import blocks_for
from forged.engine.llama_cpp.hostcache import HostCache, HostEntry
from forged.engine.llama_cpp.prefix import Block, PrefixIndex


class KvMemory(Protocol):
    """The libllama memory calls the pool makes (`llama_memory_seq_*`), on the step thread only."""

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None: ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def seq_pos_min(self, seq_id: int) -> int: ...

    def save_seq(self, seq_id: int) -> bytes: ...

    def restore_seq(self, seq_id: int, data: bytes) -> bool: ...


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # KV held at positions 0..len-1
    path: list[Block] = field(default_factory=list)  # the indexed blocks: tokens[:len(path) x tpb]
    busy: bool = False
    # Blocks this slot owns besides its indexed path. Unified: its private cells and, while busy, the
    # blocks reserved ahead of them. Streams: the blocks reserved beyond its tokens, while busy.
    extra: int = 0
    # Unified only: False once one of its blocks duplicated an indexed block (computed at the same
    # time by another slot, in other cells). Its later blocks stay private, so that an indexed block
    # always means one set of cells.
    indexable: bool = True
    last_used: int = 0

    @property
    def indexed_tokens(self) -> int:
        return len(self.path[-1].tokens) * len(self.path) if self.path else 0

    @property
    def private_tokens(self) -> int:
        return len(self.tokens) - self.indexed_tokens


@dataclass(frozen=True)
class Hit:
    """A usable cached prefix: the first `tokens` tokens of a prompt, as `holder` holds them."""

    holder: Slot | None
    tokens: int
    path: tuple[Block, ...] = ()


@dataclass(frozen=True)
class Placement:
    """Where a starting sequence runs, and how much of its prompt was found cached."""

    slot: Slot
    cached_tokens: int


class KvPool(abc.ABC):
    """What both layouts share: slots, the prefix index, hits, commits, trimming."""

    # Whether the holders of an indexed block all see the same cells (unified), or each its own copy.
    shares_cells: bool

    def __init__(self, memory: KvMemory, n_slots: int, total_blocks: int, tokens_per_block: int, *,
                 caching: bool = True, window: int = 0) -> None:
        if n_slots < 1 or total_blocks < 1:
            raise ValueError("a KV pool needs at least one slot and one block")
        self.memory = memory
        self.tpb = tokens_per_block
        self.total_blocks = total_blocks
        self.caching = caching
        # Sliding-window models keep only the last `window` positions of a sequence in their SWA
        # layers; a prefix can only be reused where those cells are still there (`_usable`).
        self.window = window
        self.index = PrefixIndex(tokens_per_block)
        self.slots = [Slot(seq_id=i) for i in range(n_slots)]
        self._tick = 0
        # The prefix cache's counters, with vLLM's meaning: prompt tokens looked up, and found.
        self.queries = 0
        self.hits = 0

    # ------------------------------------------------------------ counts

    @abc.abstractmethod
    def used_blocks(self) -> int:
        """Blocks that busy slots hold or have reserved."""

    @abc.abstractmethod
    def cached_blocks(self) -> int:
        """Blocks only idle slots hold: free capacity, reclaimed on demand."""

    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks() - self.cached_blocks()

    def detail(self) -> dict[str, Any]:
        """Figures of the cache for /v1/status."""
        return {"layout": "unified" if self.shares_cells else "streams", "enabled": self.caching,
                "indexed_blocks": self.index.size, "idle_sequences": sum(1 for s in self.slots if not s.busy
                                                                         and s.tokens)}

    def cells_used(self) -> int:
        """Cells the busy slots see (a shared cell counts once per slot that sees it)."""
        return sum(len(s.tokens) for s in self.slots if s.busy)

    # ------------------------------------------------------------ lookups

    def estimate(self, tokens: Sequence[int]) -> int:
        """Prompt tokens likely found cached. Safe from the event loop: an estimate for admission."""
        if not self.caching:
            return 0
        return min(self.index.match_length(tokens), max(len(tokens) - 1, 0))

    def find(self, tokens: Sequence[int]) -> Hit:
        """The longest usable cached prefix of `tokens`. It leaves at least one token to compute
        (whose logits give the first sample), prefers idle holders, and follows a holder's
        unindexed tail token by token."""
        if not self.caching or len(tokens) < 2:
            return Hit(None, 0)
        limit = len(tokens) - 1
        path = self.index.match(tokens, max_blocks=limit // self.tpb)
        while path:
            best = Hit(None, 0)
            for holder in sorted(path[-1].holders, key=lambda s: (s.busy, -s.last_used)):
                n = _common_prefix(holder.tokens, tokens, path[-1].end, limit)
                if n > best.tokens and self._usable(holder, n):
                    best = Hit(holder, n, tuple(path))
            if best.holder is not None:
                return best
            path = path[:-1]  # a sliding window no longer there: a shorter prefix may still serve
        # Nothing indexed matches: a prompt shorter than a block can still share an idle tail.
        best = Hit(None, 0)
        for slot in self.slots:
            if not slot.busy and slot.tokens and not slot.path:
                n = _common_prefix(slot.tokens, tokens, 0, limit)
                if n > best.tokens and self._usable(slot, n):
                    best = Hit(slot, n)
        return best

    def _usable(self, holder: Slot, n: int) -> bool:
        """Reusing n tokens of a sliding-window model needs the window before n still held."""
        if not self.window:
            return True
        return self.memory.seq_pos_min(holder.seq_id) <= max(0, n - self.window)

    # ------------------------------------------------------------ running sequences

    @abc.abstractmethod
    def start(self, prompt: Sequence[int], reserve_tokens: int) -> Placement | None:
        """A busy slot for a starting sequence, holding the longest cached prefix of `prompt`, with
        blocks for `reserve_tokens` tokens in all. None when the pool cannot hold it now."""

    @abc.abstractmethod
    def ensure(self, slot: Slot, tokens: int) -> bool:
        """Make a busy slot own blocks for `tokens` tokens, evicting cached blocks if needed (growth
        under max_utilization). False when even that is not enough."""

    def fits(self, blocks: int, sequences: int = 1) -> bool:
        """Whether `blocks` more blocks and `sequences` more slots could be had now, evicting cached
        ones (an estimate)."""
        return blocks <= self.free_blocks() + self.cached_blocks() and sequences <= self.free_slots()

    def free_slots(self) -> int:
        """Slots no running sequence writes to (idle ones give up their cache when taken)."""
        return sum(1 for s in self.slots if not s.busy)

    def fork(self, parent: Slot, reserve_tokens: int) -> Slot | None:
        """A busy slot holding everything `parent` holds (another choice of the same request, after
        its prefill), with blocks for `reserve_tokens` tokens in all. None when the pool has no slot
        or blocks for it now."""
        slot = self._fork_slot(keep=parent)
        if slot is None:
            return None
        self.memory.seq_cp(parent.seq_id, slot.seq_id, -1, -1)
        slot.tokens = list(parent.tokens)
        for block in parent.path:
            self._hold(slot, block)
        slot.indexable = parent.indexable
        return slot if self._occupy(slot, reserve_tokens) else None

    def _occupy(self, slot: Slot, reserve_tokens: int) -> bool:
        """Mark a placed slot busy with room for `reserve_tokens` tokens; False (slot released) when
        the blocks for them are not there."""
        self._set_busy(slot, True)
        self._settle(slot)
        slot.last_used = self._touch()
        if not self.ensure(slot, reserve_tokens):
            self.release(slot)
            return False
        return True

    @abc.abstractmethod
    def _fork_slot(self, keep: Slot) -> Slot | None:
        """An empty slot for a fork, made so if need be by dropping an idle one other than `keep`."""

    def commit(self, slot: Slot, tokens: Sequence[int]) -> None:
        """Record tokens whose KV a decode just wrote at the end of a busy slot; index the blocks
        that this completes."""
        slot.tokens.extend(tokens)
        self._index(slot)

    def _index(self, slot: Slot) -> None:
        """Index the slot's full blocks beyond its indexed path."""
        if not self.caching or not slot.indexable:
            return
        parent = slot.path[-1] if slot.path else None
        for key in self.index.keys(slot.tokens, start_block=len(slot.path)):
            block = self.index.child(parent, key)
            if block is None:
                block = self.index.add(parent, key)
            elif self.shares_cells:
                # Computed here too, in other cells than the indexed block's: it stays private.
                slot.indexable = False
                return
            self._hold(slot, block)
            if self.shares_cells:
                slot.extra -= 1  # the block moves from the slot's own count to the index's
            parent = block

    def release(self, slot: Slot) -> None:
        """Its sequence finished, was cancelled or preempted: the slot turns idle and its KV stays
        cached, or goes when caching is off or another slot holds all of it."""
        if not slot.busy:
            return
        self._set_busy(slot, False)
        self._settle(slot)
        slot.last_used = self._touch()
        if not self.caching or not slot.tokens:
            self.drop(slot)
        elif slot.private_tokens == 0 and slot.path and len(slot.path[-1].holders) > 1:
            self.drop(slot)  # another slot holds all of it

    def discard(self, slot: Slot) -> None:
        """Release a slot whose KV cannot be trusted (its decode failed): forget all of it."""
        if slot.busy:
            self._set_busy(slot, False)
        self.drop(slot)

    def drop(self, slot: Slot) -> None:
        """Forget an idle slot's KV: untag its cells, unindex what nobody else holds."""
        self.memory.seq_rm(slot.seq_id, -1, -1)
        self._unhold_from(slot, 0)
        slot.tokens = []
        slot.extra = 0
        slot.indexable = True

    def clear(self) -> None:
        """Forget every cached prefix (idle slots); busy ones are left alone."""
        for slot in self.slots:
            if not slot.busy and slot.tokens:
                self.drop(slot)

    # ------------------------------------------------------------ internals

    def _touch(self) -> int:
        self._tick += 1
        return self._tick

    def _trim(self, slot: Slot, n: int) -> None:
        """Keep only the first n tokens of a slot's KV."""
        if n >= len(slot.tokens):
            return
        self.memory.seq_rm(slot.seq_id, n, -1)
        self._unhold_from(slot, n // self.tpb)
        del slot.tokens[n:]
        self._settle(slot)

    def _unhold_from(self, slot: Slot, depth: int) -> None:
        for block in reversed(slot.path[depth:]):  # deepest first: a block goes before its parent
            self._unhold(slot, block)
        del slot.path[depth:]

    def _hold(self, slot: Slot, block: Block) -> None:
        block.holders.add(slot)
        slot.path.append(block)

    def _unhold(self, slot: Slot, block: Block) -> None:
        block.holders.discard(slot)
        if not block.holders:
            self.index.remove(block)

    def _set_busy(self, slot: Slot, busy: bool) -> None:
        slot.busy = busy

    def _settle(self, slot: Slot) -> None:
        """Recount what a slot owns besides its indexed path, after it changed."""
        slot.extra = 0

    def _empty_slot(self) -> Slot | None:
        return next((s for s in self.slots if not s.busy and not s.tokens), None)

    def _lru_idle(self, exclude: Callable[[Slot], bool] = lambda s: False) -> Slot | None:
        idle = [s for s in self.slots if not s.busy and s.tokens and not exclude(s)]
        return min(idle, key=lambda s: s.last_used) if idle else None


class UnifiedPool(KvPool):
    """One pool of `total_blocks` blocks; a shared block exists once; idle slots hold the cache."""

    shares_cells = True

    def __init__(self, memory: KvMemory, n_slots: int, total_blocks: int, tokens_per_block: int, *,
                 caching: bool = True, window: int = 0) -> None:
        super().__init__(memory, n_slots, total_blocks, tokens_per_block, caching=caching, window=window)
        self._busy_blocks = 0  # indexed blocks some busy slot holds
        self._idle_blocks = 0  # indexed blocks only idle slots hold

    def used_blocks(self) -> int:
        return self._busy_blocks + sum(s.extra for s in self.slots if s.busy)

    def cached_blocks(self) -> int:
        return self._idle_blocks + sum(s.extra for s in self.slots if not s.busy)

    def start(self, prompt: Sequence[int], reserve_tokens: int) -> Placement | None:
        hit = self.find(prompt)
        holder = hit.holder
        if not self.fits(blocks_for(reserve_tokens, self.tpb) - hit.tokens // self.tpb):
            return None  # before anything is evicted for nothing
        if holder is not None and not holder.busy and len(holder.tokens) - hit.tokens < self.tpb:
            # What the holder has beyond the hit is less than a block: continue in its own slot.
            slot = holder
            self._trim(slot, hit.tokens)
            cached = hit.tokens
        else:
            slot = self._empty_slot() or self._free_a_slot(keep=holder)
            if slot is None:
                return None
            # Only indexed blocks are shared, so that a shared block is always one set of cells.
            shared = min(len(hit.path), hit.tokens // self.tpb) if holder is not None else 0
            cached = shared * self.tpb
            if cached:
                assert holder is not None
                self.memory.seq_cp(holder.seq_id, slot.seq_id, 0, cached)  # tags cells; moves nothing
                for block in hit.path[:shared]:
                    self._hold(slot, block)
                slot.tokens = list(prompt[:cached])
                holder.last_used = self._touch()
        if not self._occupy(slot, reserve_tokens):
            return None
        self.queries += len(prompt)
        self.hits += cached
        return Placement(slot, cached)

    def ensure(self, slot: Slot, tokens: int) -> bool:
        need = blocks_for(max(tokens - slot.indexed_tokens, 0), self.tpb) - slot.extra
        if need <= 0:
            return True
        if not self._evict(need, keep=slot):
            return False
        slot.extra += need
        return True

    def _evict(self, need: int, keep: Slot) -> bool:
        """Trim idle slots, least recently used first, until `need` blocks are free."""
        while self.free_blocks() < need:
            victim = self._lru_idle(exclude=lambda s: s is keep)
            if victim is None:
                return False
            self._shrink(victim, need - self.free_blocks())
        return True

    def _shrink(self, slot: Slot, blocks: int) -> None:
        """Give back up to `blocks` of an idle slot's own blocks, from its end; drop the slot when
        that is all it owns."""
        first_own = len(slot.path)
        while first_own > 0 and slot.path[first_own - 1].holders == {slot}:
            first_own -= 1
        own_private = blocks_for(slot.private_tokens, self.tpb)
        own = own_private + len(slot.path) - first_own
        if blocks >= own:
            self.drop(slot)
        elif blocks <= own_private:
            self._trim(slot, slot.indexed_tokens + (own_private - blocks) * self.tpb)
        else:
            self._trim(slot, (len(slot.path) - (blocks - own_private)) * self.tpb)

    def _fork_slot(self, keep: Slot) -> Slot | None:
        return self._empty_slot() or self._free_a_slot(keep=keep)

    def _free_a_slot(self, keep: Slot | None) -> Slot | None:
        """Every sequence id is taken: drop the least recently used idle holder."""
        victim = self._lru_idle(exclude=lambda s: s is keep)
        if victim is not None:
            self.drop(victim)
        return victim

    def _settle(self, slot: Slot) -> None:
        private = blocks_for(slot.private_tokens, self.tpb)
        slot.extra = max(slot.extra, private) if slot.busy else private

    def _hold(self, slot: Slot, block: Block) -> None:
        before = _state(block)
        super()._hold(slot, block)
        self._retally(before, _state(block))

    def _unhold(self, slot: Slot, block: Block) -> None:
        before = _state(block)
        block.holders.discard(slot)
        self._retally(before, _state(block))
        if not block.holders:
            self.index.remove(block)

    def _set_busy(self, slot: Slot, busy: bool) -> None:
        before = [_state(b) for b in slot.path]
        slot.busy = busy
        for block, was in zip(slot.path, before, strict=True):
            self._retally(was, _state(block))

    def _retally(self, before: str, after: str) -> None:
        if before == after:
            return
        self._busy_blocks -= before == "busy"
        self._idle_blocks -= before == "idle"
        self._busy_blocks += after == "busy"
        self._idle_blocks += after == "idle"


class StreamPool(KvPool):
    """One full-context stream per sequence id; an idle stream keeps its last KV as the cache, and
    with a `host` cache its KV moves to host RAM when the stream is needed for another sequence."""

    shares_cells = False

    def __init__(self, memory: KvMemory, n_slots: int, stream_blocks: int, tokens_per_block: int, *,
                 caching: bool = True, window: int = 0, min_copy_tokens: int | None = None,
                 host: HostCache | None = None) -> None:
        super().__init__(memory, n_slots, n_slots * stream_blocks, tokens_per_block, caching=caching,
                         window=window)
        self.stream_blocks = stream_blocks
        # Sharing a prefix with another stream copies a whole stream, and restoring one from host RAM
        # copies its bytes back: below this many reusable tokens recomputing them is cheaper.
        self.min_copy_tokens = 4 * tokens_per_block if min_copy_tokens is None else min_copy_tokens
        self.host = host if caching else None
        self.copies = 0
        self.copy_seconds = 0.0

    def used_blocks(self) -> int:
        return sum(blocks_for(len(s.tokens), self.tpb) + s.extra for s in self.slots if s.busy)

    def detail(self) -> dict[str, Any]:
        out = super().detail()
        out.update(stream_copies=self.copies, stream_copy_seconds=round(self.copy_seconds, 4))
        if self.host is not None:
            h = self.host
            out["host"] = {"budget_bytes": h.budget, "bytes": h.bytes, "entries": len(h.entries), "saves": h.saves,
                           "restores": h.restores, "save_seconds": round(h.save_seconds, 4),
                           "restore_seconds": round(h.restore_seconds, 4)}
        return out

    def cached_blocks(self) -> int:
        return sum(blocks_for(len(s.tokens), self.tpb) for s in self.slots if not s.busy)

    def fits(self, blocks: int, sequences: int = 1) -> bool:
        return sequences <= self.free_slots()

    def _fork_slot(self, keep: Slot) -> Slot | None:
        # libllama copies the parent's whole stream into this one at the next decode.
        slot = self._free_stream(keep=keep)
        if slot is not None:
            self.copies += 1
        return slot

    def start(self, prompt: Sequence[int], reserve_tokens: int) -> Placement | None:
        hit = self.find(prompt)
        holder = hit.holder
        idle_holder = holder is not None and not holder.busy
        saved, saved_tokens = self.host.find(prompt) if self.host else (None, 0)
        slot = None
        if saved is not None and saved_tokens >= hit.tokens + self.min_copy_tokens:
            slot = self._free_stream(keep=None)
            if slot is not None:
                cached = self._restore(slot, saved, saved_tokens)
                if cached:
                    return self._begin(slot, prompt, reserve_tokens, cached)
        if not (idle_holder and 2 * hit.tokens >= len(holder.tokens)):  # type: ignore[union-attr]
            # Another stream, not to lose the holder's KV: an empty one, else the least recently
            # used idle one (its KV goes to host RAM, or is lost).
            slot = slot or self._free_stream(keep=holder)
        if slot is None:
            if not idle_holder:
                return None
            # Most of what the idle holder has is this prompt's prefix (or no other stream is free):
            # continue in the holder's own stream.
            assert holder is not None
            slot = holder
            self._trim(slot, hit.tokens)
            return self._begin(slot, prompt, reserve_tokens, hit.tokens)
        cached = hit.tokens if holder is not None and hit.tokens >= self.min_copy_tokens else 0
        if cached:
            assert holder is not None
            started = time.perf_counter()
            # libllama copies the buffer at the next decode; the tail beyond the hit goes now.
            self.memory.seq_cp(holder.seq_id, slot.seq_id, -1, -1)
            self.memory.seq_rm(slot.seq_id, cached, -1)
            self.copy_seconds += time.perf_counter() - started
            self.copies += 1
            slot.tokens = list(prompt[:cached])
            for block in hit.path[: cached // self.tpb]:
                self._hold(slot, block)
            holder.last_used = self._touch()
        return self._begin(slot, prompt, reserve_tokens, cached)

    def _begin(self, slot: Slot, prompt: Sequence[int], reserve_tokens: int, cached: int) -> Placement:
        slot.busy = True
        slot.last_used = self._touch()
        slot.extra = 0
        self.ensure(slot, reserve_tokens)
        self.queries += len(prompt)
        self.hits += cached
        return Placement(slot, cached)

    def _free_stream(self, keep: Slot | None) -> Slot | None:
        """An empty stream, else the least recently used idle one with its KV moved out of the way."""
        slot = self._empty_slot() or self._lru_idle(exclude=lambda s: s is keep)
        if slot is not None and slot.tokens:
            if self.host is not None and len(slot.tokens) >= self.min_copy_tokens:
                started = time.perf_counter()
                if self.host.put(slot.tokens, self.memory.save_seq(slot.seq_id)):
                    self.host.saves += 1
                self.host.save_seconds += time.perf_counter() - started
            self.drop(slot)
        return slot

    def _restore(self, slot: Slot, entry: HostEntry, n: int) -> int:
        """Copy a host entry's KV into an empty stream and keep its first n tokens; 0 if it failed."""
        assert self.host is not None
        started = time.perf_counter()
        data = self.host.take(entry)
        ok = self.memory.restore_seq(slot.seq_id, data)
        self.host.restore_seconds += time.perf_counter() - started
        if not ok:
            self.memory.seq_rm(slot.seq_id, -1, -1)
            return 0
        self.host.restores += 1
        slot.tokens = list(entry.tokens)
        self._index(slot)
        self._trim(slot, n)
        if not self._usable(slot, n):
            self.drop(slot)
            return 0
        return n

    def ensure(self, slot: Slot, tokens: int) -> bool:
        # A stream always has room for a whole context (admission never lets a request past it);
        # the reservation only keeps the block counts honest.
        own = blocks_for(len(slot.tokens), self.tpb)
        slot.extra = max(min(blocks_for(tokens, self.tpb), self.stream_blocks) - own, slot.extra)
        return True

    def commit(self, slot: Slot, tokens: Sequence[int]) -> None:
        before = blocks_for(len(slot.tokens), self.tpb)
        super().commit(slot, tokens)
        slot.extra = max(slot.extra - (blocks_for(len(slot.tokens), self.tpb) - before), 0)


def _state(block: Block) -> str:
    if not block.holders:
        return "none"
    return "busy" if any(s.busy for s in block.holders) else "idle"


def _common_prefix(a: Sequence[int], b: Sequence[int], start: int, limit: int) -> int:
    """The length of the common prefix of a and b, known to be at least `start`, at most `limit`."""
    n = start
    end = min(len(a), len(b), limit)
    while n < end and a[n] == b[n]:
        n += 1
    return n
