"""The prefix index: which KV sequences hold which token prefixes, block by block.

A radix tree whose edges are whole KV blocks: a node is the `tokens_per_block` tokens at positions
[depth x tpb, (depth + 1) x tpb) that follow its parent's tokens. A child is found by its exact token
tuple (a dict key), so a hit is exact by construction: no hash can collide, and the KV found was
computed for exactly those tokens at exactly those positions. Only full blocks are indexed; the
partial block at the end of a sequence stays private to it (the slot that holds it can still reuse it
token by token, `KvPool` does that).

Each node records its *holders*: the KV slots (libllama sequence ids) whose cells hold that block. A
slot that holds a node holds all its ancestors, so the blocks of a slot form one root path.

This module is pure Python: the step thread owns it and mutates it; the event loop may only call
`match_length` (a read-only walk of dicts, safe under the GIL) for admission's estimates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


class Block:
    """One indexed KV block: its tokens, its place in the tree, and who holds it."""

    __slots__ = ("children", "depth", "holders", "parent", "tokens")

    def __init__(self, tokens: tuple[int, ...], parent: Block | None, depth: int) -> None:
        self.tokens = tokens
        self.parent = parent
        self.depth = depth  # 0 for the first block of a sequence; -1 for the root
        self.children: dict[tuple[int, ...], Block] = {}
        self.holders: set[Any] = set()

    @property
    def end(self) -> int:
        """The number of tokens from the start of the sequence through this block."""
        return (self.depth + 1) * len(self.tokens) if self.depth >= 0 else 0

    def path(self) -> list[Block]:
        """This block and its ancestors, root first (the root itself excluded)."""
        out: list[Block] = []
        node: Block | None = self
        while node is not None and node.depth >= 0:
            out.append(node)
            node = node.parent
        out.reverse()
        return out


class PrefixIndex:
    def __init__(self, tokens_per_block: int) -> None:
        if tokens_per_block < 1:
            raise ValueError("tokens_per_block must be positive")
        self.tokens_per_block = tokens_per_block
        self.root = Block((), None, -1)
        self.size = 0  # indexed blocks

    def keys(self, tokens: Sequence[int], start_block: int = 0) -> Iterator[tuple[int, ...]]:
        """The token tuples of the full blocks of `tokens`, from block `start_block` on."""
        tpb = self.tokens_per_block
        for start in range(start_block * tpb, len(tokens) - tpb + 1, tpb):
            yield tuple(tokens[start:start + tpb])

    def match(self, tokens: Sequence[int], max_blocks: int | None = None) -> list[Block]:
        """The longest path of indexed blocks (with at least one holder) that `tokens` starts with."""
        path: list[Block] = []
        node = self.root
        for key in self.keys(tokens):
            if max_blocks is not None and len(path) >= max_blocks:
                break
            child = node.children.get(key)
            if child is None or not child.holders:
                break
            path.append(child)
            node = child
        return path

    def match_length(self, tokens: Sequence[int]) -> int:
        """Tokens of `tokens` found indexed, in whole blocks. Read-only: safe from another thread for
        an estimate (a concurrent change makes it stale, never wrong in kind)."""
        try:
            return len(self.match(tokens)) * self.tokens_per_block
        except RuntimeError:  # a dict resized mid-walk by the step thread: no estimate this time
            return 0

    def child(self, parent: Block | None, tokens: tuple[int, ...]) -> Block | None:
        return (parent or self.root).children.get(tokens)

    def add(self, parent: Block | None, tokens: tuple[int, ...]) -> Block:
        """Index a new block under `parent` (None: the root); no block with these tokens may be
        indexed there yet (`child` says)."""
        node = parent or self.root
        if len(tokens) != self.tokens_per_block:
            raise ValueError(f"a block holds {self.tokens_per_block} tokens, got {len(tokens)}")
        if tokens in node.children:
            raise ValueError("a block with these tokens is already indexed here")
        block = Block(tokens, node, node.depth + 1)
        node.children[tokens] = block
        self.size += 1
        return block

    def remove(self, block: Block) -> None:
        """Unindex a block that nobody holds any more. Its descendants are gone already: whoever
        holds a block holds its ancestors, and holders let go of the deepest block first."""
        if block.holders or block.children:
            raise ValueError("cannot remove a block that is still held or has indexed children")
        parent = block.parent
        if parent is not None and parent.children.get(block.tokens) is block:
            del parent.children[block.tokens]
            self.size -= 1
