"""The unified page pool (S-LoRA): one device tensor of fixed-size pages for KV blocks and adapter rows.

A page holds one KV block (block_size tokens of K and V for every layer) or a run of adapter rows.
Everything is allocated in whole pages from one free list, so the pool never fragments. The pool only
allocates; who gets evicted or preempted is the scheduler's decision.
"""
from collections import deque

import torch

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
        return len(self.free_pages)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free_pages), f"asked for {n} pages, {len(self.free_pages)} free"
        pages = [self.free_pages.popleft() for _ in range(n)]
        self.used.update(pages)
        self.peak_used = max(self.peak_used, len(self.used))
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            assert page in self.used, f"page {page} freed twice or never allocated"
            self.used.remove(page)
            self.free_pages.append(page)

    # KV blocks of a sequence (the Sequence owns its block table)
    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate_kv(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= self.num_free

    def allocate_kv(self, seq: Sequence) -> None:
        assert not seq.block_table
        seq.block_table = self.allocate(self.blocks_needed(seq.num_tokens))

    def free_kv(self, seq: Sequence) -> None:
        self.free(seq.block_table)
        seq.block_table = []
