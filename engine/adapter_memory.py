"""Adapters resident in the page pool: their rows, slots and the tables the LoRA kernels read.

An adapter of rank r puts r rows of A^T (d_in long) and r rows of B (d_out long) per target module into
pool pages, packed back to back (a row never straddles two pages), so a rank-8 adapter takes an eighth
of the pages of a rank-64 one. For each projection group the kernels read, per layer:
  a_rows/b_rows [n_slices, slots, max_rank]: element offset of each row in the flat pool,
  ranks [n_slices, slots] (0 = the adapter does not target that slice), scales [n_slices, slots].
A load is one copy of the adapter file's tensor bytes to the device (and one of its small tables), then one
kernel (kernels/adapter_rows.py) that writes the rows into the pages, transposing lora_B on the way.
Which adapter to load or evict is the scheduler's decision; this class only does it.
"""
import math
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.adapter_config import adapter_dir, configured_ranks, read_adapter_config
from engine.adapter_file import FLOAT_DTYPES, AdapterFile
from engine.model import LORA_GROUPS, ModelArgs
from engine.page_pool import PagePool
from kernels import kernel_ops

GROUP_OF = {m: (g, i) for g, members in LORA_GROUPS.items() for i, m in enumerate(members)}
ROW_COLUMNS = ("src", "step", "length")   # with "dst": what scatter_rows reads per row


def row_layout(pieces: list[tuple[int, int]], page_numel: int) -> tuple[list[tuple[int, int, int]], int]:
    """Place pieces of (rows, row_len) back to back in pages without splitting a row across pages.

    Returns runs (piece, offset of the run's first row, rows), offsets relative to the adapter's first page
    with pages laid end to end, and the number of pages used. One layout serves the planner's page estimate
    and the real load; it costs O(pieces + pages), whatever the ranks.
    """
    page, used, runs = 0, 0, []
    for i, (rows, row_len) in enumerate(pieces):
        assert row_len <= page_numel, f"a row of {row_len} does not fit a page of {page_numel}"
        placed = 0
        while placed < rows:
            fit = min(rows - placed, (page_numel - used) // row_len)
            if fit == 0:
                page, used = page + 1, 0
                continue
            runs.append((i, page * page_numel + used, fit))
            used, placed = used + fit * row_len, placed + fit
    return runs, page + 1 if used else page


def row_offsets(runs: list[tuple[int, int, int]], pieces: list[tuple[int, int]]) -> np.ndarray:
    """The offset of every row, piece after piece, from row_layout's runs."""
    if not runs:
        return np.empty(0, np.int64)
    piece, start, count = (np.asarray(column, dtype=np.int64) for column in zip(*runs))
    row_len = np.asarray([length for _, length in pieces], dtype=np.int64)[piece]
    within = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return np.repeat(start, count) + within * np.repeat(row_len, count)


def config_pages(root: str | None, adapter_id: str, args: ModelArgs, page_numel: int, max_rank: int,
                 storage_options: dict | None = None) -> int:
    """Pages an adapter will take, from its adapter_config.json alone (no weights read): what the planner sizes
    adapters with. Bounded work: the config is read up to 1 MiB, ranks are checked against max_rank before any
    layout, patterns run under a time budget. A config the engine would refuse counts 1 page: the adapter fails
    when loaded and its rows become error rows."""
    if not root:
        return 1
    try:
        fs, base = adapter_dir(root, adapter_id, storage_options)
        ranks = configured_ranks(read_adapter_config(fs, base, adapter_id), args, max_rank)
        return max(row_layout(adapter_pieces(args, ranks), page_numel)[1], 1)
    except Exception:  # noqa: BLE001 - AdapterError, storage errors: the load will say what
        return 1


def adapter_pieces(args: ModelArgs, ranks: dict[tuple[int, str], int]) -> list[tuple[int, int]]:
    """Row pieces of an adapter in layout order: A^T rows then B rows of each (layer, module)."""
    pieces = []
    for (layer, module), r in sorted(ranks.items()):
        d_in, d_out = args.lora_dims(module)
        pieces += [(r, d_in), (r, d_out)]
    return pieces


@dataclass(frozen=True)
class MetaLayout:
    """An adapter's int64 metadata buffer: the rows' pool offsets ("dst") and the kernels' row tables first
    (offsets relative to the adapter's first page until placed), then the rows' sources, the ranks, and the
    scales (float64 in int64 slots). Host and device read the buffer through the same views."""
    parts: tuple[tuple[str, int, tuple[int, ...]], ...]    # name, first element, shape
    numel: int
    placed: int                                            # meta[:placed] holds pool offsets

    @classmethod
    def of(cls, num_rows: int, args: ModelArgs, max_rank: int) -> "MetaLayout":
        shapes = [("dst", (num_rows,))]
        shapes += [(f"{t}.{g}", (args.num_layers, len(m), max_rank)) for t in ("a_rows", "b_rows")
                   for g, m in LORA_GROUPS.items()]
        placed = sum(math.prod(shape) for _, shape in shapes)
        shapes += [(c, (num_rows,)) for c in ROW_COLUMNS]
        shapes += [(f"{t}.{g}", (args.num_layers, len(m))) for t in ("ranks", "scales")
                   for g, m in LORA_GROUPS.items()]
        parts, pos = [], 0
        for name, shape in shapes:
            parts.append((name, pos, shape))
            pos += math.prod(shape)
        return cls(tuple(parts), pos, placed)

    def views(self, meta: torch.Tensor) -> dict[str, torch.Tensor]:
        views = {}
        for name, start, shape in self.parts:
            view = meta[start:start + math.prod(shape)]
            views[name] = (view.view(torch.float64) if name.startswith("scales") else view).view(shape)
        return views


@dataclass
class RowSource:
    """The rows whose weights are stored in one dtype: their byte span in the weights and their range of rows."""
    dtype: torch.dtype
    start: int
    end: int
    rows: slice
    max_len: int


@dataclass
class PackedAdapter:
    """An adapter ready to load: the file's tensor bytes as stored, and where each row goes, relative to the
    adapter's first page. Built on the host in a read-ahead thread; no weight is copied to build it."""
    adapter_id: str
    sha256: str
    weights: torch.Tensor        # uint8: the file's tensor bytes (pinned on CUDA)
    meta: torch.Tensor           # int64, laid out by `layout` (pinned on CUDA)
    layout: MetaLayout
    rel: np.ndarray              # meta[:layout.placed] before placing: offsets relative to the first page
    num_pages: int
    sources: list[RowSource]
    copied: Any = None           # CUDA event: a copy may read `meta` until it has passed

    @property
    def nbytes(self) -> int:
        return self.weights.numel() + self.meta.numel() * self.meta.element_size()

    def place(self, pages: list[int], page_numel: int) -> None:
        """Turn the relative offsets into pool offsets for the pages this load got."""
        page_ids = np.asarray(pages, dtype=np.int64)
        self.meta.numpy()[:self.layout.placed] = page_ids[self.rel // page_numel] * page_numel + self.rel % page_numel


def pack_adapter(file: AdapterFile, args: ModelArgs, page_numel: int, max_rank: int,
                 pin_memory: bool = False) -> PackedAdapter:
    """Where each row of the file goes. Vectorized over rows: this runs in reader threads for every load and
    holds the GIL, which the engine loop needs too."""
    keys = sorted(file.modules)
    modules = [file.modules[key] for key in keys]
    pieces = adapter_pieces(args, {key: m.rank for key, m in zip(keys, modules)})
    runs, num_pages = row_layout(pieces, page_numel)
    dst = row_offsets(runs, pieces)
    tensors = [t for m in modules for t in (m.a, m.b)]   # piece 2i is module i's A rows, 2i + 1 its B^T rows
    dtypes = sorted({t.dtype for t in tensors})         # rows are grouped by the dtype they are stored in
    span = {d: (min(t.start for t in tensors if t.dtype == d), max(t.end for t in tensors if t.dtype == d))
            for d in dtypes}
    layout = MetaLayout.of(len(dst), args, max_rank)
    start = {name: first for name, first, _ in layout.parts}
    meta = torch.empty(layout.numel, dtype=torch.int64, pin_memory=pin_memory)
    values = meta.numpy()
    values[:] = 0
    views = {name: view.numpy() for name, view in layout.views(meta).items()}
    # per piece: where its first row starts in its dtype's span, the distance between its rows there and between
    # a row's elements (a row of A is a row of lora_A [r, d_in]; a row of B^T a column of lora_B [d_out, r]),
    # its row length, where its row 0 goes in the kernels' table, and its dtype's index
    columns = []
    for (layer, module), m in zip(keys, modules):
        (g, s), (d_in, d_out) = GROUP_OF[module], args.lora_dims(module)
        views[f"ranks.{g}"][layer, s], views[f"scales.{g}"][layer, s] = m.rank, m.scale
        cell = (layer * len(LORA_GROUPS[g]) + s) * max_rank
        columns.append((m.a, d_in, 1, d_in, start[f"a_rows.{g}"] + cell))
        columns.append((m.b, 1, m.rank, d_out, start[f"b_rows.{g}"] + cell))
    first, row_stride, step, row_len, table, kind = (np.asarray(c) for c in zip(*(
        ((t.start - span[t.dtype][0]) // t.torch_dtype.itemsize, *rest, dtypes.index(t.dtype))
        for t, *rest in columns)))
    rank = np.repeat([m.rank for m in modules], 2)
    piece = np.repeat(np.arange(len(tensors)), rank)
    k = np.arange(len(dst)) - np.repeat(np.cumsum(rank) - rank, rank)
    values[table[piece] + k] = dst
    order = np.argsort(kind[piece], kind="stable")
    for column, rows in (("dst", dst), ("src", first[piece] + k * row_stride[piece]), ("step", step[piece]),
                         ("length", row_len[piece])):
        views[column][:] = rows[order]
    counts = np.bincount(kind[piece], minlength=len(dtypes))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    sources = [RowSource(FLOAT_DTYPES[d][0], *span[d], slice(int(bounds[i]), int(bounds[i + 1])),
                         int(row_len[kind == i].max())) for i, d in enumerate(dtypes)]
    return PackedAdapter(file.adapter_id, file.sha256, file.data, meta, layout, values[:layout.placed].copy(),
                         num_pages, sources)


class ResidentAdapters:
    def __init__(self, args: ModelArgs, pool: PagePool, num_slots: int, max_rank: int, device: str, ops=None):
        self.args, self.pool, self.device = args, pool, device
        self.ops = ops or kernel_ops(str(device).startswith("cuda"))
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
        """Copy an adapter into free pool pages and point its slot's tables at them.

        On CUDA the copies and the scatter run on a side stream from pinned memory: the host does not wait,
        and only work queued after the load waits for it."""
        pages = self.pool.allocate(packed.num_pages)
        slot = self.free_slots.pop()
        if packed.copied is not None:   # an earlier load of this adapter may still be copying its metadata
            packed.copied.synchronize()
        packed.place(pages, self.pool.page_numel)
        stream = self.copy_stream
        if stream:   # the pages and the slot may have been freed by work still queued on the main stream
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream else nullcontext():
            weights = packed.weights.to(self.device, non_blocking=True)
            parts = packed.layout.views(packed.meta.to(self.device, non_blocking=True))
            for source in packed.sources:
                self.ops.scatter_rows(self.pool.flat, weights[source.start:source.end].view(source.dtype),
                                      parts["dst"][source.rows], *(parts[c][source.rows] for c in ROW_COLUMNS),
                                      source.max_len)
            for group in LORA_GROUPS:
                for name, table in (("a_rows", self.a_rows), ("b_rows", self.b_rows), ("ranks", self.ranks),
                                    ("scales", self.scales)):
                    table[group][:, :, slot] = parts[f"{name}.{group}"]
        if stream:
            packed.copied = torch.cuda.Event()
            packed.copied.record(stream)
            torch.cuda.current_stream().wait_stream(stream)
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
