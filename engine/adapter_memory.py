"""Adapters resident in the page pool: their rows, slots and the tables the LoRA kernels read.

An adapter of rank r puts r rows of A^T (d_in long) and r rows of B (d_out long) per target module into
pool pages, packed back to back (a row never straddles two pages), so a rank-8 adapter takes an eighth
of the pages of a rank-64 one. For each projection group the kernels read, per layer:
  a_rows/b_rows [n_slices, slots, max_rank]: element offset of each row in the flat pool,
  ranks [n_slices, slots] (0 = the adapter does not target that slice), scales [n_slices, slots].
Which adapter to load or evict is the scheduler's decision; this class only does it.
"""
from collections import OrderedDict

import torch

from engine.adapters import AdapterWeights
from engine.model import LORA_GROUPS, ModelArgs
from engine.page_pool import PagePool

GROUP_OF = {m: (g, i) for g, members in LORA_GROUPS.items() for i, m in enumerate(members)}


def row_layout(pieces: list[tuple[int, int]], page_numel: int) -> tuple[list[torch.Tensor], int]:
    """Place pieces of (rows, row_len) back to back in pages without splitting a row across pages.

    Returns each piece's row offsets (relative to the adapter's first page, pages laid end to end)
    and the number of pages used. One layout serves the page estimate and the real load.
    """
    page, used, offsets = 0, 0, []
    for rows, row_len in pieces:
        assert row_len <= page_numel, f"a row of {row_len} does not fit a page of {page_numel}"
        piece, placed = [], 0
        while placed < rows:
            fit = min(rows - placed, (page_numel - used) // row_len)
            if fit == 0:
                page, used = page + 1, 0
                continue
            start = page * page_numel + used
            piece.append(torch.arange(start, start + fit * row_len, row_len))
            used, placed = used + fit * row_len, placed + fit
        offsets.append(torch.cat(piece) if piece else torch.empty(0, dtype=torch.int64))
    return offsets, page + 1 if used else page


def adapter_pieces(args: ModelArgs, ranks: dict[tuple[int, str], int]) -> list[tuple[int, int]]:
    """Row pieces of an adapter in layout order: A^T rows then B rows of each (layer, module)."""
    pieces = []
    for (layer, module), r in sorted(ranks.items()):
        d_in, d_out = args.lora_dims(module)
        pieces += [(r, d_in), (r, d_out)]
    return pieces


class ResidentAdapters:
    def __init__(self, args: ModelArgs, pool: PagePool, num_slots: int, max_rank: int, device: str):
        self.args, self.pool, self.device = args, pool, device
        layers = args.num_layers
        self.a_rows, self.b_rows, self.ranks, self.scales, self.slice_offsets = {}, {}, {}, {}, {}
        for group, members in LORA_GROUPS.items():
            n = len(members)
            self.a_rows[group] = torch.zeros(layers, n, num_slots, max_rank, dtype=torch.int64, device=device)
            self.b_rows[group] = torch.zeros(layers, n, num_slots, max_rank, dtype=torch.int64, device=device)
            self.ranks[group] = torch.zeros(layers, n, num_slots, dtype=torch.int32, device=device)
            self.scales[group] = torch.zeros(layers, n, num_slots, dtype=torch.float32, device=device)
            bounds = [0]
            for m in members:
                bounds.append(bounds[-1] + args.lora_dims(m)[1])
            self.slice_offsets[group] = tuple(bounds)
        self.free_slots = list(range(num_slots))
        self.resident: OrderedDict[str, tuple[int, list[int], str]] = OrderedDict()  # id -> slot, pages, sha; LRU order
        self.loads = 0
        self.bytes_loaded = 0

    def pages_needed(self, weights: AdapterWeights) -> int:
        ranks = {key: a.shape[0] for key, (a, _, _) in weights.modules.items()}
        return row_layout(adapter_pieces(self.args, ranks), self.pool.page_numel)[1]

    def slot(self, adapter_id: str) -> int:
        return self.resident[adapter_id][0]

    def sha256(self, adapter_id: str) -> str:
        return self.resident[adapter_id][2]

    def touch(self, adapter_id: str) -> None:
        self.resident.move_to_end(adapter_id)

    def can_load(self, weights: AdapterWeights) -> bool:
        return bool(self.free_slots) and self.pages_needed(weights) <= self.pool.num_free

    def load(self, weights: AdapterWeights) -> int:
        """Copy an adapter's rows into free pool pages and fill its slot in the tables."""
        keys = sorted(weights.modules)
        ranks = {key: weights.modules[key][0].shape[0] for key in keys}
        offsets, num_pages = row_layout(adapter_pieces(self.args, ranks), self.pool.page_numel)
        page_numel = self.pool.page_numel
        staging = torch.zeros(num_pages * page_numel, dtype=self.pool.pages.dtype)
        for i, key in enumerate(keys):
            a_t, b, _ = weights.modules[key]
            for rows, rel in ((a_t, offsets[2 * i]), (b, offsets[2 * i + 1])):
                staging[rel[:, None] + torch.arange(rows.shape[1])] = rows
        pages = self.pool.allocate(num_pages)
        page_ids = torch.tensor(pages, dtype=torch.int64)
        self.pool.pages[page_ids.to(self.device)] = staging.view(num_pages, page_numel).to(self.device,
                                                                                            non_blocking=True)
        slot = self.free_slots.pop()
        for group, members in LORA_GROUPS.items():
            shape = (self.args.num_layers, len(members), self.a_rows[group].shape[-1])
            a_rows, b_rows = torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int64)
            group_ranks, group_scales = torch.zeros(shape[:2], dtype=torch.int32), torch.zeros(shape[:2])
            for i, (layer, module) in enumerate(keys):
                g, s = GROUP_OF[module]
                if g != group:
                    continue
                r = ranks[(layer, module)]
                for table, rel in ((a_rows, offsets[2 * i]), (b_rows, offsets[2 * i + 1])):
                    table[layer, s, :r] = page_ids[rel // page_numel] * page_numel + rel % page_numel
                group_ranks[layer, s], group_scales[layer, s] = r, weights.modules[(layer, module)][2]
            self.a_rows[group][:, :, slot] = a_rows.to(self.device)
            self.b_rows[group][:, :, slot] = b_rows.to(self.device)
            self.ranks[group][:, :, slot] = group_ranks.to(self.device)
            self.scales[group][:, :, slot] = group_scales.to(self.device)
        self.resident[weights.adapter_id] = (slot, pages, weights.sha256)
        self.loads += 1
        self.bytes_loaded += staging.numel() * staging.element_size()
        return slot

    def unload(self, adapter_id: str) -> None:
        slot, pages, _ = self.resident.pop(adapter_id)
        for group in LORA_GROUPS:
            self.ranks[group][:, :, slot] = 0
        self.pool.free(pages)
        self.free_slots.append(slot)
