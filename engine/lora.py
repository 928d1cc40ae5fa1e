"""The LoRA part of one forward pass: which adapter slot each token uses, and the two kernel calls."""
import torch

from engine.adapter_memory import ResidentAdapters


class LoraBatch:
    """Adds y += scale * (x A) B per token by adapter slot (-1 = base model) through the kernels."""

    def __init__(self, ops, adapters: ResidentAdapters, token_slots: list[int], device: str):
        self.ops, self.adapters = ops, adapters
        self.active = any(slot >= 0 for slot in token_slots)
        if not self.active:
            return
        # Runs of equal slots become segments (the scheduler orders a batch by adapter, so runs are long).
        starts, slots = [0], []
        for i, slot in enumerate(token_slots):
            if i and slot == token_slots[i - 1]:
                continue
            if i:
                starts.append(i)
            slots.append(slot)
        starts.append(len(token_slots))
        self.max_seg_len = max(b - a for a, b in zip(starts[:-1], starts[1:]))
        self.seg_starts = torch.tensor(starts, dtype=torch.int32, device=device)
        self.seg_slots = torch.tensor(slots, dtype=torch.int32, device=device)

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        if not self.active:
            return
        a = self.adapters
        pool = a.pool.flat
        xa = self.ops.lora_shrink(x, pool, a.a_rows[group][layer], a.ranks[group][layer], self.seg_starts,
                                  self.seg_slots, self.max_seg_len)
        self.ops.lora_expand(y, xa, pool, a.b_rows[group][layer], a.ranks[group][layer], a.scales[group][layer],
                             self.seg_starts, self.seg_slots, self.max_seg_len, a.slice_offsets[group])
