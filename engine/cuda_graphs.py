"""Decode steps replayed from CUDA graphs, one per batch-size bucket (as nano-vllm does).

Inputs live in static buffers sized for the largest bucket. The LoRA tile table is a graph input sized for
the worst case (engine.lora.max_decode_tiles): the live tiles come first, the rest have slot -1 and their
programs exit at once, so a batch of new adapters needs no new capture and each adapter's rows are read
once per tile of its tokens (the segment form, as in prefill). Rows that pad a batch up to its bucket
write their K/V into a scratch page and are discarded. Each bucket has a second graph without the LoRA
kernels, for batches of base-model rows only.
"""
import numpy as np
import torch

from engine.lora import DECODE_TILE, LoraBatch, LoraWorkspace, lora_tiles, max_decode_tiles
from engine.model import Batch, Transformer
from engine.page_pool import PagePool


class DecodeGraphs:
    @torch.inference_mode()   # the buffers are then updated and read only under inference mode too
    def __init__(self, model: Transformer, ops, adapters, pool: PagePool, max_batch: int, max_blocks: int,
                 max_active_adapters: int):
        device = pool.pages.device
        self.model, self.ops, self.adapters, self.block_size = model, ops, adapters, pool.block_size
        self.max_active_adapters = max_active_adapters
        self.scratch = pool.allocate(1)[0]
        self.buckets = sorted(b for b in {1, 2, 4, 8, *range(16, max_batch + 1, 16), max_batch} if b <= max_batch)
        n = self.buckets[-1]
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.input_ids, self.positions = torch.zeros(n, **i64), torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), self.scratch * self.block_size, **i64)
        self.tiles = torch.full((max_decode_tiles(n, max_active_adapters), 3), -1, **i32)
        self.block_tables = torch.full((n, max_blocks), self.scratch, **i32)
        self.context_lens = torch.ones(n, **i32)
        self.hidden = torch.zeros(n, model.args.hidden_size, dtype=pool.pages.dtype, device=device)
        self.workspace = LoraWorkspace(device)
        self.replays = {}   # (batch size, with LoRA) -> replay
        steps = [(bs, with_lora) for bs in reversed(self.buckets) for with_lora in (True, False)]
        for bs, with_lora in steps:
            # warm-up: compiles the kernels and grows the LoRA workspace to its largest before any capture
            self.hidden[:bs] = self._forward(bs, with_lora)
        memory_pool = None
        for bs, with_lora in steps:   # largest first, so smaller graphs reuse its memory
            self.replays[bs, with_lora], memory_pool = self._capture(bs, with_lora, memory_pool)

    def _capture(self, bs: int, with_lora: bool, memory_pool):
        """Record the step of a bs-row batch; returns its replay and the memory pool the next capture shares."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (adapter reads pinning host memory) may go on meanwhile
        with torch.cuda.graph(graph, memory_pool, capture_error_mode="thread_local"):
            self.hidden[:bs] = self._forward(bs, with_lora)
        torch.cuda.synchronize()
        return graph.replay, graph.pool()

    def _forward(self, bs: int, with_lora: bool) -> torch.Tensor:
        lora = LoraBatch(self.ops, self.adapters, self.workspace, self.tiles[:self._tiles_of(bs)], DECODE_TILE) \
            if with_lora else LoraBatch.none()
        batch = Batch(False, self.slot_mapping[:bs], self.ops, lora, block_tables=self.block_tables[:bs],
                      context_lens=self.context_lens[:bs])
        return self.model(self.input_ids[:bs], self.positions[:bs], batch)

    def _tiles_of(self, bs: int) -> int:
        return max_decode_tiles(bs, self.max_active_adapters)

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def run(self, input_ids, positions, slots, token_slots, block_tables, context_lens) -> torch.Tensor | None:
        """Hidden states [n, hidden] of a decode batch of n <= the largest bucket (lists as model_runner builds;
        block_tables an int32 host tensor [n, width]), or None when its adapters need more tiles than the
        graph has (more adapters than max_active_adapters: run it eagerly)."""
        n = len(input_ids)
        bs = next(b for b in self.buckets if b >= n)
        tiles = lora_tiles(np.asarray(token_slots), DECODE_TILE)
        if tiles.shape[0] > self._tiles_of(bs):
            return None
        device = self.input_ids.device

        def put(buffer, values, pad, rows=n, size=bs):
            buffer[:rows] = torch.as_tensor(values, dtype=buffer.dtype).to(device, non_blocking=True)
            buffer[rows:size] = pad

        put(self.input_ids, input_ids, 0)
        put(self.positions, positions, 0)
        put(self.slot_mapping, slots, self.scratch * self.block_size)
        put(self.context_lens, context_lens, 1)
        put(self.tiles, tiles, -1, tiles.shape[0], self._tiles_of(bs))
        self.block_tables[:bs] = self.scratch
        self.block_tables[:n, :block_tables.shape[1]] = block_tables.to(device, non_blocking=True)
        self.replays[bs, tiles.shape[0] > 0]()
        return self.hidden[:n]
