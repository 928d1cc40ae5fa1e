"""Decode steps replayed from CUDA graphs, one per batch-size bucket (as nano-vllm does).

Inputs live in static buffers sized for the largest bucket, all views of one device buffer that a step
fills through its pinned host twin in one copy (engine.staging). The LoRA tile table is a graph input sized for
the worst case (engine.lora.max_decode_tiles): the live tiles come first, the rest have slot -1 and their
programs exit at once, so a batch of new adapters needs no new capture and each adapter's rows are read
once per tile of its tokens (the segment form, as in prefill). Rows that pad a batch up to its bucket
write their K/V into a scratch page and are discarded. Each bucket has a second graph without the LoRA
kernels, for batches of base-model rows only.
"""
import numpy as np
import torch

from engine.lora import DECODE_TILE, LoraBatch, LoraWorkspace, max_decode_tiles
from engine.model import Batch, Transformer
from engine.page_pool import PagePool
from engine.sampling import SAMPLING_FIELDS
from engine.staging import Staging


class DecodeGraphs:
    @torch.inference_mode()   # the buffers are then updated and read only under inference mode too
    def __init__(self, model: Transformer, ops, adapters, pool: PagePool, row_tokens: torch.Tensor, max_blocks: int,
                 max_active_adapters: int):
        """row_tokens: each running row's newest token on the device (ModelRunner.row_tokens): a step feeds
        row_tokens[rows], gathered inside the graph; its size is the largest batch."""
        device = pool.pages.device
        self.model, self.ops, self.adapters, self.block_size = model, ops, adapters, pool.block_size
        self.row_tokens, self.max_active_adapters = row_tokens, max_active_adapters
        self.scratch = pool.allocate(1)[0]
        max_batch = row_tokens.numel()
        self.buckets = sorted(b for b in {1, 2, 4, 8, *range(16, max_batch + 1, 16), max_batch} if b <= max_batch)
        n = self.buckets[-1]
        i32 = np.int32
        # every static input is a view of one buffer, filled through its pinned twin and sent in one copy
        # (the block tables last: a bucket's step sends the buffer only as far as its own rows of them)
        specs = dict(rows=((n,), i32), positions=((n,), i32), slot_mapping=((n,), i32), context_lens=((n,), i32),
                     tiles=((max_decode_tiles(n, max_active_adapters), 3), i32),
                     **{name: ((n,), dtype) for name, dtype in SAMPLING_FIELDS.items()},   # read by the sampler
                     block_tables=((n, max_blocks), i32))
        self.staging = Staging(device)
        self.host, self.inputs = self.staging.views(specs)
        self._pad(0, n, self.inputs)
        self.inputs["tiles"][:, 0] = -1
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

    def _pad(self, n: int, bs: int, inputs) -> None:
        """Rows n..bs of a bs bucket: one token at the scratch page, no adapter; tiles past the live ones empty."""
        inputs["rows"][n:bs] = inputs["positions"][n:bs] = 0
        inputs["slot_mapping"][n:bs] = self.scratch * self.block_size
        inputs["context_lens"][n:bs] = 1
        inputs["block_tables"][n:bs, 0] = self.scratch

    def _capture(self, bs: int, with_lora: bool, memory_pool):
        """Record the step of a bs-row batch; returns its replay and the memory pool the next capture shares."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (adapter reads pinning host memory) may go on meanwhile
        with torch.cuda.graph(graph, memory_pool, capture_error_mode="thread_local"):
            self.hidden[:bs] = self._forward(bs, with_lora)
        torch.cuda.synchronize()
        return graph.replay, graph.pool()

    def _forward(self, bs: int, with_lora: bool) -> torch.Tensor:
        inputs = self.inputs
        lora = LoraBatch(self.ops, self.adapters, self.workspace, inputs["tiles"][:self._tiles_of(bs)], DECODE_TILE) \
            if with_lora else LoraBatch.none()
        batch = Batch(False, inputs["slot_mapping"][:bs], self.ops, lora, block_tables=inputs["block_tables"][:bs],
                      context_lens=inputs["context_lens"][:bs])
        return self.model(self.row_tokens[inputs["rows"][:bs]], inputs["positions"][:bs], batch)

    def _tiles_of(self, bs: int) -> int:
        return max_decode_tiles(bs, self.max_active_adapters)

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def run(self, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Hidden states [n, hidden] of a decode batch of n <= the largest bucket and its staged inputs (arrays
        as RunningBatch.decode_inputs gives them, with sampling parameters to stage beside them), or None when
        its adapters need more tiles than the graph has (more adapters than max_active_adapters: run it
        eagerly)."""
        n, tiles = len(arrays["rows"]), arrays["tiles"]
        bs = next(b for b in self.buckets if b >= n)
        if tiles.shape[0] > self._tiles_of(bs):
            return None
        self.staging.wait()
        host = self.host
        for name in ("rows", "positions", "slot_mapping", "context_lens", *SAMPLING_FIELDS):
            if name in arrays:
                host[name][:n] = arrays[name]
        tables = arrays["block_tables"]
        host["block_tables"][:n, :tables.shape[1]] = tables
        host["tiles"][:len(tiles)] = tiles
        host["tiles"][len(tiles):self._tiles_of(bs), 0] = -1
        self._pad(n, bs, host)
        self.staging.send(self.staging.words - host["block_tables"][bs:].size)
        self.replays[bs, len(tiles) > 0]()
        return self.hidden[:n], {name: view[:n] for name, view in self.inputs.items()}
