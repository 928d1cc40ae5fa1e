"""What the benchmarks run: a random Llama-shaped model built on the device, random PEFT adapters written
straight to disk, and a request table shaped like a night of evaluations.

Nothing is downloaded. Output lengths are fixed: the checkpoint names no EOS token, so every request
generates exactly its max_new_tokens.
"""
import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from engine.loader import FUSED
from engine.model import LORA_GROUPS, ModelArgs, Transformer, rope_inv_freq
from engine.request import Request, SamplingParams

LORA_TARGETS = [m for members in LORA_GROUPS.values() for m in members]   # all seven projections
RANKS = (8, 16, 32, 64)
WEIGHT_STD = 0.02

# Llama-2-7B's shapes (no EOS token: outputs run to max_new_tokens).
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                 tie_word_embeddings=False)
TINY = dict(LLAMA2_7B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


@dataclass
class Workload:
    requests: list[Request]          # arrival order (the request table's order)
    adapter_ranks: dict[str, int]    # adapter id -> rank
    per_adapter: int = 0             # requests of each adapter's own set (the rest go by popularity)

    @property
    def output_tokens(self) -> int:
        return sum(r.sampling.max_new_tokens for r in self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    def without_adapters(self) -> "Workload":
        return Workload([replace(r, adapter_id=None) for r in self.requests], {})

    def describe(self) -> str:
        if not self.adapter_ranks:
            return f"{len(self.requests):,} requests, base model only"
        return (f"{len(self.requests):,} requests: {self.per_adapter:,} of each adapter's own, "
                f"{len(self.requests) - self.per_adapter * len(self.adapter_ranks):,} by popularity")


def write_model_dir(path: Path, hf_config: dict) -> Path:
    """config.json and a word-level tokenizer.json (one word per model token id); no weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(hf_config, architectures=["LlamaForCausalLM"])))
    vocab = {f"w{i}": i for i in range(hf_config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def random_model(args: ModelArgs, dtype: torch.dtype, device: str, seed: int = 0) -> Transformer:
    """lorafleet's Transformer with random weights made on the device (seconds for a 7B on a GPU)."""
    with torch.device("meta"):
        model = Transformer(args)
    gen = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            state[name] = (torch.randn(p.shape, generator=gen, device=device) * WEIGHT_STD).to(dtype)
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.eval()


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names (fused q/k/v and gate/up split back), as views."""
    args, state = model.args, {}
    for name, tensor in model.state_dict().items():
        fused = next((f for f in FUSED if f".{f}." in name), None)
        if fused is None:
            state[name if name == "lm_head.weight" else f"model.{name}"] = tensor
            continue
        sizes = [args.lora_dims(member)[1] for member in FUSED[fused]]
        for member, part in zip(FUSED[fused], tensor.split(sizes)):
            state[f"model.{name.replace(fused, member)}"] = part
    return state


def lora_bytes_per_rank(args: ModelArgs, element_size: int) -> int:
    """Bytes of one rank of an adapter on all seven projections: what a decode step reads per rank."""
    return args.num_layers * sum(sum(args.lora_dims(m)) for m in LORA_TARGETS) * element_size


def write_adapter(path: Path, weights: Path, rank: int) -> None:
    """A PEFT adapter folder on all seven projections whose adapter_model.safetensors is a hard link to
    `weights` (written once per rank by random_lora)."""
    path.mkdir(parents=True, exist_ok=True)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                  target_modules=LORA_TARGETS, bias="none", use_rslora=False, fan_in_fan_out=False)
    (path / "adapter_config.json").write_text(json.dumps(config))
    if not (path / "adapter_model.safetensors").exists():
        os.link(weights, path / "adapter_model.safetensors")


def write_adapters(root: Path, weights_dir: Path, n_adapters: int, args: ModelArgs, dtype: torch.dtype,
                   device: str, seed: int = 0) -> dict[str, int]:
    """N PEFT adapters on all seven projections, ranks drawn from RANKS; returns id -> rank.

    The weights of one rank are written once and hard-linked into every adapter of that rank, so 2,048
    adapters of a 7B take ~0.6 GB of disk. The engine still reads, checks and copies each id on its own.
    The first n ids of a larger set are the set of n (same ids, same ranks)."""
    rng = random.Random(seed)
    ranks = {f"a{k:05d}": rng.choice(RANKS) for k in range(n_adapters)}
    weights_dir.mkdir(parents=True, exist_ok=True)
    for adapter_id, r in ranks.items():
        weights = weights_dir / f"rank{r}.safetensors"
        if not weights.exists():
            save_file(random_lora(args, r, dtype, device, seed + r), str(weights))
        write_adapter(root / adapter_id, weights, r)
    return ranks


def random_lora(args: ModelArgs, rank: int, dtype: torch.dtype, device: str, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-named lora_A / lora_B of every layer's seven projections, random, on the CPU."""
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for layer in range(args.num_layers):
        for module in LORA_TARGETS:
            d_in, d_out = args.lora_dims(module)
            block = "mlp" if module in LORA_GROUPS["gate_up"] + LORA_GROUPS["down"] else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            for half, shape in (("A", (rank, d_in)), ("B", (d_out, rank))):
                t = torch.randn(shape, generator=gen, device=device) * WEIGHT_STD
                tensors[f"{prefix}.lora_{half}.weight"] = t.to(dtype).cpu()
    return tensors


def make_workload(n_requests: int, adapter_ranks: dict[str, int], vocab_size: int, prompt_range: tuple[int, int],
                  output_range: tuple[int, int], own_share: float = 0.8, zipf: float = 1.0, seed: int = 0) -> Workload:
    """A night of evaluations in arrival order: every adapter has its own set of requests (own_share of them,
    split evenly), written in one block as its evaluation job writes it, the blocks in random order; the other
    requests go to adapters by power-law popularity (adapter k drawn with weight 1 / (k + 1)^zipf) and arrive
    at random places in between.

    Prompt and output lengths depend on the seed only, so every N runs the same token counts."""
    lengths, pick = random.Random(seed), random.Random(seed + 1)
    names = list(adapter_ranks)
    per_adapter = int(own_share * n_requests) // len(names) if names else 0
    if names and per_adapter < 1:
        raise ValueError(f"{n_requests} requests cannot give each of {len(names)} adapters its own")
    blocks = [[a] * per_adapter for a in names]
    pick.shuffle(blocks)
    order = [a for block in blocks for a in block]
    popular = pick.choices(names, [1 / (k + 1) ** zipf for k in range(len(names))], k=n_requests - len(order)) \
        if names else [None] * n_requests
    for adapter_id in popular:
        order.insert(pick.randrange(len(order) + 1), adapter_id)
    requests = []
    for i, adapter_id in enumerate(order):
        prompt = [lengths.randrange(1, vocab_size) for _ in range(lengths.randint(*prompt_range))]
        sampling = SamplingParams(max_new_tokens=lengths.randint(*output_range))
        requests.append(Request(f"r{i:06d}", adapter_id, prompt_token_ids=prompt, sampling=sampling))
    return Workload(requests, adapter_ranks, per_adapter)
