"""The host-memory tier of the prefix cache: KV that lost its GPU stream, kept in host RAM.

When a stream's cached KV must make room for another sequence, its bytes are copied to host memory
(`llama_state_seq_get_data`) as long as they fit the byte budget (least recently used out first). A
later prompt that starts with those tokens gets them copied back into a stream
(`llama_state_seq_set_data`) instead of recomputing them. Entries are indexed like the GPU cache,
whole blocks matched exactly by their tokens. Discrete GPUs only: on unified memory the copy would
be memory into itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from forged.engine.llama_cpp.prefix import Block, PrefixIndex


@dataclass(eq=False)
class HostEntry:
    tokens: list[int]
    data: bytes
    last_used: int
    path: list[Block] = field(default_factory=list)


class HostCache:
    def __init__(self, budget_bytes: int, tokens_per_block: int) -> None:
        self.budget = budget_bytes
        self.tpb = tokens_per_block
        self.index = PrefixIndex(tokens_per_block)
        self.entries: list[HostEntry] = []
        self.bytes = 0
        self._tick = 0
        # For /v1/status and the benchmarks: copies each way, and the time they took in the step loop.
        self.saves = 0
        self.restores = 0
        self.save_seconds = 0.0
        self.restore_seconds = 0.0

    def put(self, tokens: Sequence[int], data: bytes) -> bool:
        """Keep a sequence's KV bytes; False when they alone exceed the budget."""
        if len(data) > self.budget or len(tokens) < self.tpb:
            return False
        for old in [e for e in self.entries if list(tokens[:len(e.tokens)]) == e.tokens]:
            self._remove(old)  # a prefix of what comes in: the new entry serves every hit it would
        while self.bytes + len(data) > self.budget:
            self._remove(min(self.entries, key=lambda e: e.last_used))
        self._tick += 1
        entry = HostEntry(list(tokens), data, self._tick)
        parent = None
        for key in self.index.keys(entry.tokens):
            block = self.index.child(parent, key) or self.index.add(parent, key)
            block.holders.add(entry)
            entry.path.append(block)
            parent = block
        self.entries.append(entry)
        self.bytes += len(data)
        return True

    def find(self, tokens: Sequence[int]) -> tuple[HostEntry | None, int]:
        """The entry holding the longest prefix of `tokens` (whole blocks), leaving one token."""
        path = self.index.match(tokens, max_blocks=(len(tokens) - 1) // self.tpb)
        if not path:
            return None, 0
        entry = max(path[-1].holders, key=lambda e: e.last_used)
        return entry, len(path) * self.tpb

    def take(self, entry: HostEntry) -> bytes:
        """Hand an entry's bytes back (to be restored into a stream) and forget it here."""
        self._remove(entry)
        return entry.data

    def _remove(self, entry: HostEntry) -> None:
        for block in reversed(entry.path):
            block.holders.discard(entry)
            if not block.holders:
                self.index.remove(block)
        entry.path.clear()
        self.entries.remove(entry)
        self.bytes -= len(entry.data)
