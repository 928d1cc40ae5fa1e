"""Tiny random checkpoints and PEFT adapters for tests, written with transformers + peft themselves."""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


# Chat templates as the real checkpoints write them: Meta-Llama-3-Instruct's, and a ChatML one in the
# multi-line style of Qwen2.5's (whitespace control, loop controls, a default system prompt).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{% for message in messages %}
    {% if loop.first and message.role == 'system' %}
        {% continue %}
    {% endif %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
CHAT_STYLES = {   # style -> (special tokens, bos, eos, template)
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", CHATML_TEMPLATE),
}
CHAT_VOCAB = 400
CHAT_CORPUS = ["You are a helpful assistant. Answer in one word.", "Hello there, how are you today?",
               "system user assistant tool", "The quick brown fox jumps over the lazy dog.",
               "Ünïcödé — 日本語のテキスト 🚀 ok", "line one\nline two\n\tindented"]


def build_chat_tokenizer(path, style: str) -> Path:
    """A byte-level BPE tokenizer.json holding the style's control tokens (ids 0..), and a tokenizer_config.json
    with the style's real chat template; transformers reads it as written (PreTrainedTokenizerFast)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special, bos, eos, template = CHAT_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CHAT_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=CHAT_VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": special[0],
              "chat_template": template}
    if bos:
        config["bos_token"] = bos
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def build_checkpoint(path, arch: str = "llama", *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 128, seed: int = 0, tie: bool = False,
                     rope_scaling: dict | None = None, init_std: float = 0.15, max_positions: int = 512,
                     vocab_size: int = len(SPECIAL) + len(WORDS)) -> Path:
    """A random Llama / Qwen2 / Mistral checkpoint directory readable by transformers and lorafleet."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
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
