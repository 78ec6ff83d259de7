"""KV block accounting over one unified libllama KV cache of num_blocks x tokens_per_block cells.

libllama places cells itself; forged never lets the sequences it runs need more cells than the
blocks it has handed out, so a `llama_decode` never fails for lack of KV. Reservation happens on
the event loop (admission) and growth on the step thread, hence the lock.
"""

from __future__ import annotations

import threading


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    return -(-tokens // tokens_per_block)


class BlockAllocator:
    def __init__(self, num_blocks: int, tokens_per_block: int) -> None:
        if num_blocks < 1 or tokens_per_block < 1:
            raise ValueError("num_blocks and tokens_per_block must be positive")
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self._owned: dict[str, int] = {}
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @property
    def free(self) -> int:
        return self.num_blocks - self._used

    def owned(self, owner: str) -> int:
        return self._owned.get(owner, 0)

    def try_reserve(self, owner: str, blocks: int) -> bool:
        """Make `owner` hold at least `blocks` blocks. False (and nothing changed) if they are not free."""
        with self._lock:
            have = self._owned.get(owner, 0)
            extra = blocks - have
            if extra <= 0:
                return True
            if extra > self.num_blocks - self._used:
                return False
            self._owned[owner] = blocks
            self._used += extra
            return True

    def ensure_tokens(self, owner: str, tokens: int) -> bool:
        """Grow `owner` so that it covers `tokens` cells (max_utilization's on-demand growth)."""
        return self.try_reserve(owner, blocks_for(tokens, self.tokens_per_block))

    def release_to(self, owner: str, beneficiary: str, tokens: int) -> int:
        """Free `owner`'s blocks and, in the same breath, grow `beneficiary` to cover `tokens`, so
        that no reservation made meanwhile on another thread can take the blocks in between."""
        with self._lock:
            n = self._owned.pop(owner, 0)
            self._used -= n
            want = blocks_for(tokens, self.tokens_per_block) - self._owned.get(beneficiary, 0)
            if 0 < want <= self.num_blocks - self._used:
                self._owned[beneficiary] = self._owned.get(beneficiary, 0) + want
                self._used += want
            return n

    def release(self, owner: str) -> int:
        with self._lock:
            n = self._owned.pop(owner, 0)
            self._used -= n
            return n
