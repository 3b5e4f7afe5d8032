"""Prompt caches: llama.cpp's per-slot cache and vLLM's automatic prefix cache."""

from __future__ import annotations

from collections import OrderedDict
from itertools import count


def common_prefix(a: list[str], b: list[str]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotCache:
    """llama-server slots: each keeps the tokens of its last request (prompt + reply).

    A new request takes the idle slot whose cached tokens cover the largest share of its
    prompt, if that share reaches `similarity` (llama-server's `--slot-prompt-similarity`,
    0.1 in current builds); otherwise the least recently used idle slot. Only the part of
    the prompt after the common prefix is prefilled.
    """

    def __init__(self, slots: int, similarity: float = 0.1) -> None:
        self.tokens: list[list[str]] = [[] for _ in range(slots)]
        self.busy = [False] * slots
        self._clock = count()
        self.last_used = [next(self._clock) for _ in range(slots)]
        self.similarity = similarity

    def acquire(self, prompt: list[str]) -> tuple[int, int]:
        """Take an idle slot for `prompt`; return (slot id, cached prompt tokens)."""
        idle = [i for i, busy in enumerate(self.busy) if not busy]
        if not idle:
            raise RuntimeError("no idle slot")  # the engine admits only up to the slot count
        best, best_n = -1, 0
        for i in idle:
            n = common_prefix(self.tokens[i], prompt)
            if n > best_n:
                best, best_n = i, n
        if best < 0 or best_n < self.similarity * len(prompt):
            best = min(idle, key=lambda i: self.last_used[i])
            best_n = common_prefix(self.tokens[best], prompt)
        self.busy[best] = True
        return best, min(best_n, max(0, len(prompt) - 1))

    def release(self, slot: int, tokens: list[str]) -> None:
        self.tokens[slot] = tokens
        self.busy[slot] = False
        self.last_used[slot] = next(self._clock)

    @property
    def processing(self) -> int:
        return sum(self.busy)


class BlockCache:
    """vLLM's automatic prefix caching over full blocks of `block_size` tokens, LRU."""

    def __init__(self, capacity_blocks: int, block_size: int = 16) -> None:
        self.block_size = block_size
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def _hashes(self, tokens: list[str]) -> list[int]:
        hashes, parent = [], 0
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            parent = hash((parent, tuple(tokens[start:start + self.block_size])))
            hashes.append(parent)
        return hashes

    def lookup(self, prompt: list[str]) -> int:
        """Prompt tokens already cached (whole leading blocks); refreshes their LRU age."""
        hit = 0
        for h in self._hashes(prompt):
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            hit += self.block_size
        return min(hit, max(0, len(prompt) - 1))

    def insert(self, tokens: list[str]) -> None:
        for h in self._hashes(tokens):
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
