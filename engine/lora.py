"""The LoRA part of one forward pass: which adapter slot each token uses, and the two kernel calls."""
import torch

from engine.adapter_memory import ResidentAdapters


class LoraBatch:
    """Adds y += scale * (x A) B per token by adapter slot (-1 = base model) through the kernels.

    Tokens come in segments that share a slot: seg_starts [n_seg + 1] token bounds, seg_slots [n_seg].
    seg_slots None means no token of the batch uses an adapter."""

    def __init__(self, ops, adapters: ResidentAdapters, seg_starts: torch.Tensor | None,
                 seg_slots: torch.Tensor | None, max_seg_len: int):
        self.ops, self.adapters = ops, adapters
        self.seg_starts, self.seg_slots, self.max_seg_len = seg_starts, seg_slots, max_seg_len

    @classmethod
    def from_token_slots(cls, ops, adapters: ResidentAdapters, token_slots: list[int], device) -> "LoraBatch":
        """Runs of equal slots become segments (the scheduler orders a batch by adapter, so runs are long)."""
        if all(slot < 0 for slot in token_slots):
            return cls(ops, adapters, None, None, 0)
        starts, slots = [], []
        for i, slot in enumerate(token_slots):
            if not slots or slot != slots[-1]:
                starts.append(i)
                slots.append(slot)
        starts.append(len(token_slots))
        max_seg_len = max(b - a for a, b in zip(starts[:-1], starts[1:]))
        return cls(ops, adapters, torch.tensor(starts, dtype=torch.int32, device=device),
                   torch.tensor(slots, dtype=torch.int32, device=device), max_seg_len)

    def add(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> None:
        if self.seg_slots is None:
            return
        a = self.adapters
        pool = a.pool.flat
        xa = self.ops.lora_shrink(x, pool, a.a_rows[group][layer], a.ranks[group][layer], self.seg_starts,
                                  self.seg_slots, self.max_seg_len)
        self.ops.lora_expand(y, xa, pool, a.b_rows[group][layer], a.ranks[group][layer], a.scales[group][layer],
                             self.seg_starts, self.seg_slots, self.max_seg_len, a.slice_offsets[group])
