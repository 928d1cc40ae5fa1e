"""The LoRA part of one forward pass: which tokens use which adapter slot (as tiles), and the kernel calls."""
import numpy as np
import torch

from engine.adapter_memory import ResidentAdapters

# Tokens a tile holds: a decode step's tokens of one adapter are few (the smallest tensor-core M), a
# prefill's many. The kernels are configured for these two sizes.
DECODE_TILE, PREFILL_TILE = 16, 64


def lora_tiles(token_slots: np.ndarray, tile_size: int) -> np.ndarray:
    """[n_tiles, 3] int32 rows (slot, first token, token count): every run of equal slots >= 0 (the
    scheduler orders a batch by slot, so each adapter is one run) cut into tiles of at most tile_size."""
    token_slots = np.asarray(token_slots, dtype=np.int64)
    if token_slots.size == 0:
        return np.zeros((0, 3), dtype=np.int32)
    starts = np.flatnonzero(np.r_[True, token_slots[1:] != token_slots[:-1]])
    ends = np.r_[starts[1:], token_slots.size]
    keep = token_slots[starts] >= 0
    starts, ends = starts[keep], ends[keep]
    per_run = -(-(ends - starts) // tile_size)
    run = np.repeat(np.arange(starts.size), per_run)
    first = starts[run] + tile_size * (np.arange(run.size) - np.repeat(np.cumsum(per_run) - per_run, per_run))
    count = np.minimum(ends[run] - first, tile_size)
    return np.stack([token_slots[starts][run], first, count], axis=1).astype(np.int32)


def max_decode_tiles(batch_size: int, max_active_adapters: int) -> int:
    """Tiles a decode batch can need: each adapter's run leaves at most one partial tile."""
    return -(-batch_size // DECODE_TILE) + max_active_adapters


class LoraWorkspace:
    """Scratch for lora_shrink's split-K partials, reused by every layer and step: grown when a larger batch
    comes, never allocated per call. A CUDA graph keeps its own, sized before capture."""

    def __init__(self, device):
        self.buffer = torch.empty(0, dtype=torch.float32, device=device)

    def xa(self, split_k: int, n_slices: int, n_tokens: int, max_rank: int) -> torch.Tensor:
        n = split_k * n_slices * n_tokens * max_rank
        if self.buffer.numel() < n:
            self.buffer = torch.empty(n, dtype=torch.float32, device=self.buffer.device)
        return self.buffer[:n].view(split_k, n_slices, n_tokens, max_rank)


class LoraBatch:
    """Adds y += scale * (x A) B per token by adapter slot through the kernels, for every projection group
    of every layer of one forward pass. tiles None: no token of the batch uses an adapter."""

    def __init__(self, ops, adapters: ResidentAdapters, workspace: LoraWorkspace | None, tiles: torch.Tensor | None,
                 tile_size: int):
        self.ops, self.adapters, self.workspace = ops, adapters, workspace
        self.tiles, self.tile_size = tiles, tile_size

    @classmethod
    def none(cls) -> "LoraBatch":
        return cls(None, None, None, None, 0)

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        if self.tiles is None:
            return
        a = self.adapters
        a_rows, ranks = a.a_rows[group][layer], a.ranks[group][layer]
        n_slices, _, max_rank = a_rows.shape
        split_k = self.ops.lora_split_k(self.tiles.shape[0], n_slices, max_rank, x.shape[1], self.tile_size)
        xa = self.workspace.xa(split_k, n_slices, x.shape[0], max_rank)
        pool = a.pool.flat
        self.ops.lora_shrink(x, pool, a_rows, ranks, self.tiles, self.tile_size, xa)
        self.ops.lora_expand(y, xa, pool, a.b_rows[group][layer], ranks, a.scales[group][layer], self.tiles,
                             self.tile_size, a.slice_offsets[group])
