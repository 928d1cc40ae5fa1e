"""Owns the device: the model, the page pool, resident adapters; turns a batch of sequences into tokens."""
import numpy as np
import torch

from engine.adapter_memory import ResidentAdapters
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.loader import load_model
from engine.lora import DECODE_TILE, PREFILL_TILE, LoraBatch, LoraWorkspace
from engine.model import Batch, ModelArgs, Transformer
from engine.page_pool import PagePool
from engine.sampling import sample_next_tokens
from engine.sequence import Sequence
from kernels import kernel_ops


def pool_geometry(config: EngineConfig, args: ModelArgs) -> tuple[int, int, int]:
    """(block_size, page_numel, num_pages) of the page pool for this model and config."""
    block_size = config.block_size
    # A page must hold the longest adapter row; grow the KV block until it does.
    longest_row = max(args.hidden_size, args.intermediate_size, args.num_heads * args.head_dim)
    while PagePool.page_numel_for(args.num_layers, block_size, args.num_kv_heads, args.head_dim) < longest_row:
        block_size *= 2
    page_numel = PagePool.page_numel_for(args.num_layers, block_size, args.num_kv_heads, args.head_dim)
    page_bytes = page_numel * torch.finfo(config.torch_dtype).bits // 8
    if config.num_pages:
        num_pages = config.num_pages
    elif config.device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()   # called after the weights are on the device
        num_pages = int(free * config.pool_memory_fraction) // page_bytes
    else:
        num_pages = max(config.cpu_pool_bytes // page_bytes, 8)
    return block_size, page_numel, num_pages


def use_device(device: str) -> torch.device:
    """The torch device of `cpu`, `cuda` or `cuda:N`, made current when it is a GPU: streams, graphs, Triton
    launches and mem_get_info use the current device. A plain `cuda` is the current one."""
    if not device.startswith("cuda"):
        return torch.device(device)
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: Transformer | None = None):
        """`model`: an already built model (benchmarks build random weights on the device); default: load it."""
        self.config = config
        self.device = use_device(config.device)
        self.model = model or load_model(config.model, config.torch_dtype, self.device, config.storage_options)
        self.args = args = self.model.args
        self.ops = kernel_ops(config.use_triton)
        block_size, _, num_pages = pool_geometry(config, args)
        self.pool = PagePool(num_pages, args.num_layers, block_size, args.num_kv_heads, args.head_dim,
                             config.torch_dtype, self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.pool.kv_cache(i)
        self.adapters = ResidentAdapters(args, self.pool, config.max_resident_adapters, config.max_lora_rank,
                                         self.device)
        self.lora_workspace = LoraWorkspace(self.device)
        self.max_model_len = min(config.max_model_len or args.max_position_embeddings, args.max_position_embeddings,
                                 args.sliding_window or args.max_position_embeddings)
        self.graphs = None
        if config.device.startswith("cuda") and config.cuda_graphs and config.use_triton:
            self.graphs = DecodeGraphs(self.model, self.ops, self.adapters, self.pool, config.max_num_seqs,
                                       self.pool.blocks_needed(self.max_model_len), config.max_active_adapters)

    def _slot_of(self, seq: Sequence) -> int:
        return -1 if seq.adapter_id is None else self.adapters.slot(seq.adapter_id)

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One forward pass over the batch; returns each sequence's next token."""
        return sample_next_tokens(self.forward_logits(seqs, is_prefill), seqs)

    @torch.inference_mode()
    def forward_logits(self, seqs: list[Sequence], is_prefill: bool) -> torch.Tensor:
        """Float32 logits [B, vocab] at each sequence's last token."""
        block_size = self.pool.block_size
        if is_prefill:
            # Prefill feeds every token (a preempted sequence recomputes its generated tokens too).
            input_ids, positions, slots, token_slots, cu = [], [], [], [], [0]
            for seq in seqs:
                n = seq.num_tokens
                input_ids += seq.token_ids
                positions += range(n)
                slots += [seq.kv_slot(p, block_size) for p in range(n)]
                token_slots += [self._slot_of(seq)] * n
                cu.append(cu[-1] + n)
            batch = Batch(True, self._tensor(slots), self.ops, None, cu_seqlens=self._tensor(cu, torch.int32),
                          max_seqlen=max(s.num_tokens for s in seqs))
            last = self._tensor([c - 1 for c in cu[1:]])
        else:
            input_ids, positions, slots, token_slots, context_lens = [], [], [], [], []
            for seq in seqs:
                n = len(seq.token_ids)
                input_ids.append(seq.token_ids[-1])
                positions.append(n - 1)
                slots.append(seq.kv_slot(n - 1, block_size))
                token_slots.append(self._slot_of(seq))
                context_lens.append(n)
            width = max(len(seq.block_table) for seq in seqs)
            # through numpy: torch.tensor of nested lists is ~3x slower, and this runs every step
            tables = torch.from_numpy(np.array([seq.block_table + [0] * (width - len(seq.block_table))
                                                for seq in seqs], dtype=np.int32))
            if self.graphs and self.graphs.fits(len(seqs)):
                hidden = self.graphs.run(input_ids, positions, slots, token_slots, tables, context_lens)
                if hidden is not None:
                    return self.model.compute_logits(hidden)
            batch = Batch(False, self._tensor(slots), self.ops, None, block_tables=tables.to(self.device),
                          context_lens=self._tensor(context_lens, torch.int32))
            last = None
        batch.lora = LoraBatch.from_token_slots(self.ops, self.adapters, self.lora_workspace, token_slots,
                                                PREFILL_TILE if is_prefill else DECODE_TILE)
        hidden = self.model(self._tensor(input_ids), self._tensor(positions), batch)
        return self.model.compute_logits(hidden if last is None else hidden[last])
