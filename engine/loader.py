"""Load a Hugging Face checkpoint (config + safetensors, sharded or not) from any fsspec URL.

Weight names follow transformers; the one conversion we make is fusing q/k/v and gate/up into the
model's `qkv_proj` and `gate_up_proj` (one matmul each).
"""
import json
import re

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from engine.model import ModelArgs, Transformer, rope_inv_freq

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def read_json(url: str, storage_options: dict | None = None, missing_ok: bool = False) -> dict | None:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if missing_ok and not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


def read_safetensors(url: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Local files are memory-mapped; remote ones are read whole (safetensors never unpickles)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if "file" in fs.protocol:
        return load_file(path)
    with fs.open(path, "rb") as f:
        return load_safetensors_bytes(f.read())


def load_model_args(model_url: str, storage_options: dict | None = None) -> ModelArgs:
    return ModelArgs.from_hf_config(read_json(f"{model_url.rstrip('/')}/config.json", storage_options))


def checkpoint_files(model_url: str, storage_options: dict | None = None) -> list[str]:
    base = model_url.rstrip("/")
    index = read_json(f"{base}/model.safetensors.index.json", storage_options, missing_ok=True)
    if index is not None:
        return [f"{base}/{name}" for name in sorted(set(index["weight_map"].values()))]
    fs, path = fsspec.core.url_to_fs(base, **(storage_options or {}))
    if not fs.exists(f"{path}/model.safetensors"):
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json under {model_url}"
                                " (only safetensors checkpoints are read)")
    return [f"{base}/model.safetensors"]


def to_model_state_dict(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers names -> ours: strip the `model.` prefix and fuse q/k/v and gate/up."""
    state, parts = {}, {}
    for name, tensor in hf_state.items():
        name = name.removeprefix("model.")
        m = re.fullmatch(r"(layers\.\d+\.\w+)\.(\w+_proj)\.(weight|bias)", name)
        fused = next((f for f, members in FUSED.items() if m and m.group(2) in members), None)
        if fused:
            parts[(f"{m.group(1)}.{fused}.{m.group(3)}", m.group(2))] = tensor
        else:
            state[name] = tensor
    for fused_name in {key for key, _ in parts}:
        fused = next(f for f in FUSED if f".{f}." in fused_name)
        state[fused_name] = torch.cat([parts[(fused_name, member)] for member in FUSED[fused]])
    return state


def load_model(model_url: str, dtype: torch.dtype, device: str,
               storage_options: dict | None = None) -> Transformer:
    args = load_model_args(model_url, storage_options)
    with torch.device("meta"):
        model = Transformer(args)
    hf_state = {}
    for url in checkpoint_files(model_url, storage_options):
        hf_state.update(read_safetensors(url, storage_options))
    state = {k: v.to(device=device, dtype=dtype) for k, v in to_model_state_dict(hf_state).items()}
    if args.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    unexpected = [k for k in unexpected if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"checkpoint {model_url} does not fit {args.model_type}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.inv_freq = rope_inv_freq(args).to(device)   # buffers built on meta hold no values
    return model.eval().requires_grad_(False)
