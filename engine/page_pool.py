"""The unified page pool (S-LoRA): one device tensor of fixed-size pages for KV blocks and adapter rows.

A page holds one KV block (block_size tokens of K and V for every layer) or a run of adapter rows.
Everything is allocated in whole pages from one free list, so the pool never fragments. The pool only
allocates; who gets evicted or preempted is the scheduler's decision. KV pages of a shared prompt prefix
(engine/prefix_cache.py) may have several holders; such a page is free when the last one lets go.
"""
from collections import Counter, deque

import torch

from engine.prefix_cache import PrefixCache
from engine.sequence import Sequence


class PagePool:
    def __init__(self, num_pages: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str):
        self.num_pages, self.block_size = num_pages, block_size
        self.kv_shape = (num_layers, 2, block_size, num_kv_heads, head_dim)
        self.page_numel = 2 * num_layers * block_size * num_kv_heads * head_dim
        self.pages = torch.zeros(num_pages, self.page_numel, dtype=dtype, device=device)
        self.free_pages: deque[int] = deque(range(num_pages))
        self.used: set[int] = set()
        self.peak_used = 0
        self.sharers: Counter[int] = Counter()   # holders of a used page beyond its first
        self.prefix_cache = PrefixCache()

    @staticmethod
    def page_numel_for(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim

    @property
    def flat(self) -> torch.Tensor:
        return self.pages.view(-1)

    def kv_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V caches of one layer: [num_pages, block_size, Hkv, D] strided views into the pool."""
        kv = self.pages.view(self.num_pages, *self.kv_shape)
        return kv[:, layer, 0], kv[:, layer, 1]

    @property
    def num_free(self) -> int:
        return len(self.free_pages) + len(self.prefix_cache.idle)   # idle cached pages are taken back on demand

    def allocate(self, n: int) -> list[int]:
        assert n <= self.num_free, f"asked for {n} pages, {self.num_free} free"
        pages = [self.free_pages.popleft() if self.free_pages else self.prefix_cache.reclaim() for _ in range(n)]
        self.used.update(pages)
        self.peak_used = max(self.peak_used, len(self.used))
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            assert page in self.used, f"page {page} freed twice or never allocated"
            if self.sharers[page]:      # another sequence still holds this prefix page
                self.sharers[page] -= 1
                continue
            self.used.remove(page)
            if not self.prefix_cache.release(page):
                self.free_pages.append(page)

    def _hold(self, page: int) -> None:
        """One more holder of a cached prefix page."""
        if page in self.used:
            self.sharers[page] += 1
            return
        self.prefix_cache.revive(page)
        self.used.add(page)
        self.peak_used = max(self.peak_used, len(self.used))

    # KV blocks of a sequence (the Sequence owns its block table)
    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate_kv(self, seq: Sequence) -> bool:
        shared = self.prefix_cache.lookup(seq.prefix_keys)
        idle = sum(page in self.prefix_cache.idle for page in shared)   # held again: no longer free
        return self.blocks_needed(seq.num_tokens) - len(shared) + idle <= self.num_free

    def allocate_kv(self, seq: Sequence) -> None:
        """Pages for all of seq's tokens: the cached pages of its prompt prefix shared, the rest new."""
        assert not seq.block_table
        shared = self.prefix_cache.lookup(seq.prefix_keys)
        for page in shared:
            self._hold(page)
        new = self.allocate(self.blocks_needed(seq.num_tokens) - len(shared))
        self.prefix_cache.insert(seq.prefix_keys[len(shared):], new)
        seq.block_table = shared + new
        seq.num_cached_tokens = len(shared) * self.block_size

    def free_kv(self, seq: Sequence) -> None:
        self.free(seq.block_table)
        seq.block_table = []
