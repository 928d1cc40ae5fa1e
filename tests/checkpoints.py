"""Tiny random checkpoints and PEFT adapters for tests, written with transformers + peft themselves."""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{i}" for i in range(120)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tokenizer(path: Path, words: list[str] = WORDS) -> None:
    """Word-level tokenizer.json (+ tokenizer_config.json); ids: <pad>=0 <s>=1 </s>=2 <unk>=3, then words."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "pad_token": "<pad>", "add_bos_token": True}))


def build_checkpoint(path, arch: str = "llama", *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 128, seed: int = 0, tie: bool = False,
                     rope_scaling: dict | None = None, init_std: float = 0.15, max_positions: int = 512) -> Path:
    """A random Llama / Qwen2 / Mistral checkpoint directory readable by transformers and lorafleet."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    kwargs = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie, initializer_range=init_std,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():   # random biases too, so Qwen2's q/k/v biases matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(path)
    return path


def build_adapter(path, base_dir, *, rank: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
                  use_rslora: bool = False, seed: int = 1, init_std: float = 0.2, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved as adapter_model.safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    path = Path(path)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets) if not isinstance(targets, str)
                        else targets, use_rslora=use_rslora, lora_dropout=0.0, **lora_kwargs)
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * init_std)
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_peft_adapter(path, hidden: int, intermediate: int, layers: int, kv_dim: int, *, rank: int,
                       targets: list[str], alpha: float, seed: int, init_std: float = 0.2) -> Path:
    """A PEFT-format adapter written directly (same files save_pretrained writes), for tests that need
    hundreds of them: building each through peft would take a second apiece."""
    from safetensors.torch import save_file
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv_dim), "v_proj": (hidden, kv_dim),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module in targets:
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            d_in, d_out = dims[module]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) * init_std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * init_std
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
        "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM"}))
    return path
