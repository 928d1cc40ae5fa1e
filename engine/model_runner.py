"""Owns the device: the model, the page pool, resident adapters; turns a batch of sequences into tokens."""
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from engine.adapter_memory import ResidentAdapters
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.loader import load_model
from engine.logprobs import score_continuations
from engine.lora import DECODE_TILE, PREFILL_TILE, LoraBatch, LoraWorkspace, lora_tiles
from engine.model import Batch, ModelArgs, Transformer
from engine.page_pool import PagePool
from engine.sampling import NONFINITE, SAMPLING_FIELDS, SamplingBatch, sample_tokens
from engine.sequence import Sequence
from engine.staging import Staging
from kernels import kernel_ops


@dataclass
class StepTokens:
    """A launched step's sampled tokens: on the device (the next step may use them at once) and on their way
    to the host (pinned memory on CUDA; on CPU the same tensor)."""
    device: torch.Tensor
    host: torch.Tensor
    copied: "torch.cuda.Event | None"

    def read(self) -> np.ndarray:
        """The tokens on the host, once the copy is done (the only wait of a step)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.numpy()


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
                                         self.device, self.ops)
        self.lora_workspace = LoraWorkspace(self.device)
        self.staging = Staging(self.device)
        # each running row's newest token, written by the step that samples it: the next decode step reads
        # its inputs here, so the host need not have read the tokens before launching it
        self.row_tokens = torch.zeros(config.max_num_seqs, dtype=torch.int32, device=self.device)
        if self.device.type == "cuda":
            self._host_tokens = [torch.empty(config.max_num_seqs, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            self._host_turn = 0
        self.max_model_len = min(config.max_model_len or args.max_position_embeddings, args.max_position_embeddings,
                                 args.sliding_window or args.max_position_embeddings)
        self.graphs = None
        if config.device.startswith("cuda") and config.cuda_graphs and config.use_triton:
            self.graphs = DecodeGraphs(self.model, self.ops, self.adapters, self.pool, self.row_tokens,
                                       self.pool.blocks_needed(self.max_model_len), config.max_active_adapters)

    def release_cached_memory(self) -> None:
        """After running out of device memory: give the allocator's cached blocks back (CUDA only)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _slot_of(self, seq: Sequence) -> int:
        return -1 if seq.adapter_id is None else self.adapters.slot(seq.adapter_id)

    def run(self, seqs: list[Sequence], rows: np.ndarray, decode_inputs: dict[str, np.ndarray] | None,
            sampling: tuple[dict[str, np.ndarray], bool] | None) -> tuple[StepTokens, torch.Tensor]:
        """Queue one forward pass and the sampling of each row's next token on the device; nothing is read back.
        A prefill of `seqs` (decode_inputs None; a scored sequence's log-probs are filled in on the way), or
        the decode step decode_inputs describes (RunningBatch.decode_inputs, in the order of `seqs`). rows: the
        RunningBatch rows of `seqs`; sampling: RunningBatch.sampling of them (None: every row greedy).
        Returns (the tokens, int64 [B], NONFINITE where the logits were NaN or Inf; logits [B, vocab])."""
        params, truncates = sampling or ({}, False)
        if decode_inputs is None:
            logits, inputs = self.prefill_logits(seqs, rows=rows, **params)
        else:
            logits, inputs = self.decode_logits({**decode_inputs, **params})
        batch = SamplingBatch(**{name: inputs[name] for name in params}, truncates=truncates) if params else None
        tokens, nonfinite = sample_tokens(logits, batch)
        tokens.masked_fill_(nonfinite, NONFINITE)
        self.row_tokens[inputs["rows"]] = tokens.clamp(min=0).to(torch.int32)   # what the next decode step feeds
        return self._send_to_host(tokens), logits

    def _send_to_host(self, tokens: torch.Tensor) -> "StepTokens":
        """Start the copy of a step's tokens to the host. Two pinned buffers take turns: a step's tokens are
        read before the step after next is launched."""
        if self.device.type != "cuda":
            return StepTokens(tokens, tokens, None)
        self._host_turn = 1 - self._host_turn
        host = self._host_tokens[self._host_turn][:len(tokens)]
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return StepTokens(tokens, host, copied)

    @torch.inference_mode()
    def prefill_logits(self, seqs: list[Sequence], **extra: np.ndarray) -> tuple[torch.Tensor, dict]:
        """Float32 logits [B, vocab] at each sequence's last token, after feeding its tokens (a preempted sequence
        recomputes its generated tokens too) but those in shared prefix pages, and the step's staged inputs
        (`extra` arrays staged with them); a scored sequence's log-probs are filled in on the way
        (engine/logprobs.py)."""
        block_size = self.pool.block_size
        cached = np.fromiter((seq.num_cached_tokens for seq in seqs), np.int64, len(seqs))
        lens = np.fromiter((seq.num_tokens for seq in seqs), np.int64, len(seqs)) - cached     # tokens to feed
        starts = np.cumsum(lens) - lens
        positions = np.arange(int(lens.sum())) - np.repeat(starts - cached, lens)
        blocks = np.fromiter((len(seq.block_table) for seq in seqs), np.int64, len(seqs))
        tables = np.fromiter(chain.from_iterable(seq.block_table for seq in seqs), np.int64, int(blocks.sum()))
        pages = tables[np.repeat(np.cumsum(blocks) - blocks, lens) + positions // block_size]
        token_slots = np.repeat([self._slot_of(seq) for seq in seqs], lens)
        arrays = dict(
            input_ids=np.fromiter(chain.from_iterable(seq.token_ids[seq.num_cached_tokens:] for seq in seqs), np.int64,
                                  len(positions)),
            positions=positions, slot_mapping=pages * block_size + positions % block_size,
            cu_seqlens=np.r_[starts, lens.sum()], last=starts + lens - 1, tiles=lora_tiles(token_slots, PREFILL_TILE))
        if cached.any():   # new tokens after shared prefix pages read those pages' K/V from the cache
            block_tables = np.zeros((len(seqs), int(blocks.max())), np.int64)
            block_tables[np.arange(block_tables.shape[1]) < blocks[:, None]] = tables    # row by row, padded with 0
            arrays.update(block_tables=block_tables, context_lens=cached + lens)
        inputs = self.staging.put({**arrays, **extra}, SAMPLING_FIELDS)
        batch = Batch(True, inputs["slot_mapping"], self.ops, self._lora(inputs["tiles"], PREFILL_TILE),
                      cu_seqlens=inputs["cu_seqlens"], max_seqlen=int(lens.max()),
                      block_tables=inputs.get("block_tables"), context_lens=inputs.get("context_lens"))
        hidden = self.model(inputs["input_ids"], inputs["positions"], batch)
        score_continuations(seqs, hidden, starts.tolist(), self.model.compute_logits)
        return self.model.compute_logits(hidden[inputs["last"]]), inputs

    @torch.inference_mode()
    def decode_logits(self, arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict]:
        """Float32 logits [B, vocab] of one decode step (arrays: RunningBatch.decode_inputs, and sampling
        parameters to stage with them) and the step's staged inputs."""
        if self.graphs and self.graphs.fits(len(arrays["rows"])):
            replayed = self.graphs.run(arrays)
            if replayed is not None:
                hidden, inputs = replayed
                return self.model.compute_logits(hidden), inputs
        inputs = self.staging.put(arrays, SAMPLING_FIELDS)
        batch = Batch(False, inputs["slot_mapping"], self.ops, self._lora(inputs["tiles"], DECODE_TILE),
                      block_tables=inputs["block_tables"], context_lens=inputs["context_lens"])
        hidden = self.model(self.row_tokens[inputs["rows"]], inputs["positions"], batch)
        return self.model.compute_logits(hidden), inputs

    def _lora(self, tiles: torch.Tensor, tile_size: int) -> LoraBatch:
        if not tiles.shape[0]:
            return LoraBatch.none()
        return LoraBatch(self.ops, self.adapters, self.lora_workspace, tiles, tile_size)
