"""Adapters resident in the page pool: their rows, slots and the tables the LoRA kernels read.

An adapter of rank r puts r rows of A^T (d_in long) and r rows of B (d_out long) per target module into
pool pages, packed back to back (a row never straddles two pages), so a rank-8 adapter takes an eighth
of the pages of a rank-64 one. For each projection group the kernels read, per layer:
  a_rows/b_rows [n_slices, slots, max_rank]: element offset of each row in the flat pool,
  ranks [n_slices, slots] (0 = the adapter does not target that slice), scales [n_slices, slots].
Which adapter to load or evict is the scheduler's decision; this class only does it.
"""
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

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


@dataclass
class PackedAdapter:
    """An adapter laid out as the pages it will occupy, with row offsets relative to its first page.
    Built on the host (in a read-ahead thread), so loading it is one copy into the pool."""
    adapter_id: str
    sha256: str
    pages: torch.Tensor                   # [num_pages, page_numel], pinned on CUDA
    rel_a: dict[str, torch.Tensor]        # group -> [layers, n_slices, max_rank] offsets of A^T rows
    rel_b: dict[str, torch.Tensor]        # group -> [layers, n_slices, max_rank] offsets of B rows
    ranks: dict[str, torch.Tensor]        # group -> [layers, n_slices] int32
    scales: dict[str, torch.Tensor]       # group -> [layers, n_slices] float32

    @property
    def num_pages(self) -> int:
        return self.pages.shape[0]

    @property
    def nbytes(self) -> int:
        return self.pages.numel() * self.pages.element_size()


def _copy_rows(flat: torch.Tensor, rows: torch.Tensor, offsets: list[int]) -> None:
    """flat[offsets[k]:offsets[k] + d] = rows[k], one slice copy per run of rows laid back to back."""
    d, i = rows.shape[1], 0
    while i < len(offsets):
        j = i + 1
        while j < len(offsets) and offsets[j] == offsets[j - 1] + d:
            j += 1
        flat[offsets[i]: offsets[i] + (j - i) * d] = rows[i:j].reshape(-1)
        i = j


def pack_adapter(weights: AdapterWeights, args: ModelArgs, page_numel: int, max_rank: int,
                 pin_memory: bool = False) -> PackedAdapter:
    keys = sorted(weights.modules)
    ranks = {key: weights.modules[key][0].shape[0] for key in keys}
    offsets, num_pages = row_layout(adapter_pieces(args, ranks), page_numel)
    dtype = next(iter(weights.modules.values()))[0].dtype
    pages = torch.zeros(num_pages * page_numel, dtype=dtype, pin_memory=pin_memory)
    shapes = {g: (args.num_layers, len(members)) for g, members in LORA_GROUPS.items()}
    rel_a = {g: torch.zeros(*shape, max_rank, dtype=torch.int64) for g, shape in shapes.items()}
    rel_b = {g: torch.zeros(*shape, max_rank, dtype=torch.int64) for g, shape in shapes.items()}
    group_ranks = {g: torch.zeros(shape, dtype=torch.int32) for g, shape in shapes.items()}
    group_scales = {g: torch.zeros(shape, dtype=torch.float32) for g, shape in shapes.items()}
    for i, (layer, module) in enumerate(keys):
        a_t, b, scale = weights.modules[(layer, module)]
        g, s = GROUP_OF[module]
        r = ranks[(layer, module)]
        for rows, rel, table in ((a_t, offsets[2 * i], rel_a), (b, offsets[2 * i + 1], rel_b)):
            _copy_rows(pages, rows, rel.tolist())
            table[g][layer, s, :r] = rel
        group_ranks[g][layer, s], group_scales[g][layer, s] = r, scale
    return PackedAdapter(weights.adapter_id, weights.sha256, pages.view(num_pages, page_numel), rel_a, rel_b,
                         group_ranks, group_scales)


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
        self.copy_stream = torch.cuda.Stream() if str(device).startswith("cuda") else None

    def slot(self, adapter_id: str) -> int:
        return self.resident[adapter_id][0]

    def sha256(self, adapter_id: str) -> str:
        return self.resident[adapter_id][2]

    def touch(self, adapter_id: str) -> None:
        self.resident.move_to_end(adapter_id)

    def pages_held(self, adapter_ids: list[str]) -> int:
        return sum(len(self.resident[a][1]) for a in adapter_ids)

    def can_load(self, packed: PackedAdapter) -> bool:
        return bool(self.free_slots) and packed.num_pages <= self.pool.num_free

    def load(self, packed: PackedAdapter) -> int:
        """Copy an adapter's pages into free pool pages and point its slot's tables at them.

        On CUDA the copy runs on a side stream from pinned memory: the host does not wait, and only work
        queued after the load waits for it."""
        pages = self.pool.allocate(packed.num_pages)
        slot = self.free_slots.pop()
        if self.copy_stream:   # the pages and the slot may have been freed by work still queued on the main stream
            self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream) if self.copy_stream else nullcontext():
            page_ids = torch.tensor(pages, dtype=torch.int64).to(self.device, non_blocking=True)
            self.pool.pages[page_ids] = packed.pages.to(self.device, non_blocking=True)
            page_numel = self.pool.page_numel
            for group in LORA_GROUPS:
                for table, rel in ((self.a_rows, packed.rel_a), (self.b_rows, packed.rel_b)):
                    rel = rel[group].to(self.device, non_blocking=True)
                    table[group][:, :, slot] = page_ids[rel // page_numel] * page_numel + rel % page_numel
                self.ranks[group][:, :, slot] = packed.ranks[group].to(self.device, non_blocking=True)
                self.scales[group][:, :, slot] = packed.scales[group].to(self.device, non_blocking=True)
        if self.copy_stream:
            torch.cuda.current_stream().wait_stream(self.copy_stream)
        self.resident[packed.adapter_id] = (slot, pages, packed.sha256)
        self.loads += 1
        self.bytes_loaded += packed.nbytes
        return slot

    def unload(self, adapter_id: str) -> None:
        slot, pages, _ = self.resident.pop(adapter_id)
        for group in LORA_GROUPS:
            self.ranks[group][:, :, slot] = 0
        self.pool.free(pages)
        self.free_slots.append(slot)
