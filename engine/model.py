"""Llama-family decoder (Llama, Mistral, Qwen2) as one plain torch module.

Tokens of all sequences in a batch are packed into one flat dimension (no padding). The forward pass
takes a `Batch` that says where each token's K/V goes in the paged cache, how to attend, and which
adapter slot each token uses; LoRA deltas are added right after each base projection. The small ops
(RMSNorm with the residual add, RoPE with the K/V cache write, SiLU-and-mul) and attention come from
`batch.ops`: fused Triton kernels on CUDA, their torch references elsewhere.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# LoRA target modules grouped by the fused projection that serves them, in slice order.
LORA_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
               "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        # transformers 5 writes rope settings as `rope_parameters`; older configs as rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3)")
        heads = cfg["num_attention_heads"]
        llama_bias = cfg.get("attention_bias", False)
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
        return cls(
            model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            qkv_bias=model_type == "qwen2" or llama_bias, o_bias=model_type != "qwen2" and llama_bias,
            mlp_bias=cfg.get("mlp_bias", False), tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            sliding_window=sliding)

    def lora_dims(self, module: str) -> tuple[int, int]:
        """(in, out) features of a LoRA target module."""
        q, kv, h, i = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.hidden_size, \
            self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}[module]


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies with the checkpoint's theta and scaling (as transformers computes them)."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); the residual is updated in place (kernels/rms_norm.py)."""
        return ops.rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.num_heads, args.num_kv_heads, \
            args.head_dim
        self.q_size, self.kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.scale = args.head_dim ** -0.5
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.o_bias)
        self.k_cache = self.v_cache = None   # [num_pages, block_size, Hkv, D] views of the page pool

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: "Batch") -> torch.Tensor:
        qkv = self.qkv_proj(x)
        batch.lora.add(qkv, x, self.layer, "qkv")
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.n_heads, self.head_dim)
        k = k.view(-1, self.n_kv_heads, self.head_dim)
        v = v.view(-1, self.n_kv_heads, self.head_dim)
        batch.ops.rope_and_store_kv(q, k, v, cos, sin, self.k_cache, self.v_cache, batch.slot_mapping)
        if batch.is_prefill and batch.block_tables is not None:   # after shared prefix pages (engine/prefix_cache.py)
            o = batch.ops.paged_prefill_attention(q, self.k_cache, self.v_cache, batch.block_tables, batch.cu_seqlens,
                                                  batch.context_lens, batch.max_seqlen, self.scale)
        elif batch.is_prefill:
            o = batch.ops.prefill_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, self.scale)
        else:
            o = batch.ops.paged_attention_decode(q, self.k_cache, self.v_cache, batch.block_tables,
                                                 batch.context_lens, self.scale)
        o = o.flatten(1)
        out = self.o_proj(o)
        batch.lora.add(out, o, self.layer, "o")
        return out


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor, batch: "Batch") -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        batch.lora.add(gate_up, x, self.layer, "gate_up")
        h = batch.ops.silu_and_mul(gate_up)
        out = self.down_proj(h)
        batch.lora.add(out, h, self.layer, "down")
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, layer)

    def forward(self, x, residual, cos, sin, batch):
        """(this layer's MLP output, the residual stream before it): the next norm adds the two."""
        x, residual = self.input_layernorm(x, residual, batch.ops)
        x = self.self_attn(x, cos, sin, batch)
        x, residual = self.post_attention_layernorm(x, residual, batch.ops)
        return self.mlp(x, batch), residual


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # _weight skips the random init (loading overwrites it; on `meta` it would import torch._dynamo).
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: "Batch") -> torch.Tensor:
        """Hidden states [T, hidden] for the packed tokens of the batch."""
        x, residual = self.embed_tokens(input_ids), None
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, batch)
        return self.norm(x, residual, batch.ops)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


@dataclass
class Batch:
    """Everything a forward pass needs beyond token ids and positions."""
    is_prefill: bool
    slot_mapping: torch.Tensor              # [T] cache slot (page * block_size + offset) of each token
    ops: object                             # kernels.kernel_ops(...)
    lora: "object"                          # engine.lora.LoraBatch (adds LoRA deltas; a no-op without adapters)
    cu_seqlens: torch.Tensor | None = None  # prefill: [B + 1] token boundaries
    max_seqlen: int = 0
    block_tables: torch.Tensor | None = None  # decode, and prefill after cached prefixes: [B, max_blocks]
    context_lens: torch.Tensor | None = None  # the same: [B] tokens of each sequence
