"""Adapters built to hurt (issue 14): each is refused with a message that says why, in bounded time and
memory, and a refusal that the config alone decides never reads the weights."""
import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine.adapters
from engine.adapter_config import configured_ranks
from engine.adapters import AdapterError, read_adapter
from engine.loader import load_model_args
from tests.checkpoints import build_checkpoint, write_peft_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    build_checkpoint(root / "model", "llama")
    write_peft_adapter(root / "adapters" / "good", 64, 128, 2, 32, rank=4, targets=TARGETS, alpha=8, seed=1)
    return root


def read(base, adapter_id, dtype=torch.float32, root=None):
    args = load_model_args(str(base / "model"))
    return read_adapter(str(root or base / "adapters"), adapter_id, args, dtype, max_rank=64)


def variant(base, name, config=None, tensors=None) -> None:
    """A copy of the good adapter with its config fields replaced and/or its tensors edited."""
    path = base / "adapters" / name
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base / "adapters" / "good", path)
    if config is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        save_file(tensors(load_file(path / "adapter_model.safetensors")), path / "adapter_model.safetensors")


def weights_never_read(monkeypatch):
    monkeypatch.setattr(engine.adapters, "read_adapter_file",
                        lambda *a, **k: pytest.fail("the weights were read for an adapter its config refuses"))


def poison(key_part: str, value: float, dtype: torch.dtype):
    def edit(tensors):
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
        name = next(k for k in sorted(tensors) if key_part in k)
        tensors[name].view(-1)[len(tensors[name].view(-1)) // 2] = value
        return tensors
    return edit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("key_part, value", [("layers.0.self_attn.q_proj.lora_A", float("nan")),
                                             ("layers.1.mlp.down_proj.lora_B", float("inf")),
                                             ("layers.1.self_attn.v_proj.lora_A", float("-inf"))])
def test_non_finite_weights_are_refused_naming_the_tensor(base, key_part, value, dtype):
    name = f"nan-{key_part[:20]}-{str(dtype)[6:]}"
    variant(base, name, tensors=poison(key_part, value, dtype))
    with pytest.raises(AdapterError, match=rf"{key_part.replace('.', '[.]')}.*NaN or Inf"):
        read(base, name)


def test_values_the_engine_dtype_cannot_hold_are_refused(base):
    variant(base, "big-values", tensors=poison("layers.1.mlp.down_proj.lora_A", 1e6, torch.float32))
    assert read(base, "big-values").adapter_id == "big-values"                # fits float32 and bfloat16
    assert read(base, "big-values", dtype=torch.bfloat16).adapter_id == "big-values"
    with pytest.raises(AdapterError, match="down_proj.lora_A.*up to 1e[+]06, beyond torch.float16"):
        read(base, "big-values", dtype=torch.float16)


@pytest.mark.parametrize("field, value, message", [
    ("r", 10**8, "r = 100000000 exceeds the engine's max_lora_rank 64"),
    ("r", 0, "r = 0: a LoRA needs rank >= 1"),
    ("r", -3, "rank >= 1"),
    ("r", True, "must be an integer rank"),
    ("r", 8.0, "must be an integer rank"),
    ("rank_pattern", {"v_proj": 10**8}, "rank_pattern for model.layers.0.self_attn.v_proj = 100000000 exceeds"),
    ("rank_pattern", {"q_proj": 0}, "rank >= 1"),
    ("lora_alpha", float("nan"), "lora_alpha must be a finite number"),
    ("lora_alpha", "16", "lora_alpha must be a finite number"),
])
def test_config_ranks_and_alphas_are_checked_before_the_weights(base, monkeypatch, field, value, message):
    variant(base, "bad-config", config={field: value})
    weights_never_read(monkeypatch)
    with pytest.raises(AdapterError, match=message):
        read(base, "bad-config")


def test_weights_of_rank_0_or_above_the_limit_are_refused(base):
    def rank(r):
        return lambda tensors: {k: (v[:r] if "lora_A" in k else v[:, :r]).contiguous() for k, v in tensors.items()}
    variant(base, "rank0-weights", tensors=rank(0))
    with pytest.raises(AdapterError, match="the weights' rank = 0: a LoRA needs rank >= 1"):
        read(base, "rank0-weights")
    variant(base, "rank96-weights", config={"r": 8}, tensors=lambda t: {
        k: torch.zeros(96, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 96) for k, v in t.items()})
    with pytest.raises(AdapterError, match="the weights' rank = 96 exceeds"):
        read(base, "rank96-weights")


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.int32, "I32"), (torch.uint8, "U8"),
                                         (torch.bool, "BOOL"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_tensors_not_in_floating_point_are_refused(base, dtype, name):
    variant(base, f"dtype-{name}", tensors=lambda t: {k: (v * 10).to(dtype) if "lora_B" in k else v
                                                      for k, v in t.items()})
    with pytest.raises(AdapterError, match=f"lora_B.weight' is {name}: LoRA weights must be floating point"):
        read(base, f"dtype-{name}")


@pytest.mark.parametrize("field, value, message", [
    ("target_modules", r"(.|..)*(?<![sdj])", "takes too long to match module names"),
    ("target_modules", r"([\w.]|[\w.][\w.])*[^jsd]", "takes too long"),
    ("rank_pattern", {r"(.|..)*(?<![sdj])": 8}, "rank_pattern pattern .* takes too long"),
    ("alpha_pattern", {r"([\w.]|[\w.][\w.])*[^jsd]": 8}, "alpha_pattern pattern .* takes too long"),
    ("target_modules", "((q{100}){100}){100}", "repeats too much"),
    ("target_modules", "q" * 2000, "pattern of 2000 characters"),
    ("target_modules", "(" * 400 + "q" + ")" * 400, "cannot be compiled"),
    ("target_modules", "q{99999999999}", "not a valid regular expression: the repetition number"),
])
def test_patterns_run_in_bounded_time_and_memory(base, field, value, message):
    """Nested quantifiers would backtrack for hours on module names, and the regex compiler would unroll
    nested counted repeats into gigabytes; both are refused within the per-adapter budget."""
    variant(base, "bad-pattern", config={field: value})
    with pytest.raises(AdapterError, match=message):
        read(base, "bad-pattern")
    config = json.loads((base / "adapters" / "bad-pattern" / "adapter_config.json").read_text())
    if field != "alpha_pattern":                              # the planner's view is bounded the same way
        with pytest.raises(AdapterError, match=message):
            configured_ranks(config, load_model_args(str(base / "model")), 64)


def test_a_benign_regex_still_matches_like_peft(base):
    variant(base, "regex-ok", config={"target_modules": r".*\.(q_proj|v_proj|down_proj)",
                                      "rank_pattern": {r"layers\.\d+\.mlp\.down_proj": 4}})
    assert sorted({m for _, m in read(base, "regex-ok").modules}) == ["down_proj", "q_proj", "v_proj"]


def test_symlinks_out_of_the_adapter_root_are_refused(base, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(base / "adapters" / "good", outside / "a")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / "a", root / "linked-dir")                    # the folder leads out
    shutil.copytree(base / "adapters" / "good", root / "linked-file")
    (root / "linked-file" / "adapter_model.safetensors").unlink()     # a file leads out
    os.symlink(outside / "a" / "adapter_model.safetensors", root / "linked-file" / "adapter_model.safetensors")
    shutil.copytree(base / "adapters" / "good", root / "real")
    os.symlink(root / "real", root / "alias")                         # within the root: followed
    for adapter_id, what in [("linked-dir", "linked-dir"), ("linked-file", "adapter_model.safetensors")]:
        with pytest.raises(AdapterError, match=f"{what} is a symlink to .*outside the adapter root"):
            read(base, adapter_id, root=root)
    assert read(base, "alias", root=root).sha256 == read(base, "real", root=root).sha256


def header_file(path, header: dict, data: bytes, length: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def test_hostile_headers_are_refused_without_reading_beyond_the_file(base):
    good = load_file(base / "adapters" / "good" / "adapter_model.safetensors")
    a_name = next(k for k in sorted(good) if "lora_A" in k)
    shape = list(good[a_name].shape)
    size = good[a_name].numel() * 4
    entry = {"dtype": "F32", "shape": shape, "data_offsets": [0, size]}
    cases = {
        "huge-length": ({a_name: entry}, b"\0" * size, 2**62, "header length"),
        "past-the-end": ({a_name: {**entry, "data_offsets": [0, size * 1000]}}, b"\0" * size, None, "disagree"),
        "overlap": ({a_name: entry, a_name.replace("lora_A", "lora_B"): {**entry, "shape": shape[::-1]}},
                    b"\0" * size, None, "do not tile"),
        "misaligned": ({a_name: {**entry, "shape": [shape[0], 1], "data_offsets": [2, 2 + 4 * shape[0]]}},
                       b"\0" * (2 + 4 * shape[0]), None, "misaligned"),
        "giant-shape": ({a_name: {**entry, "shape": [10**8, 64]}}, b"\0" * size, None, "disagree"),
        "float-shape": ({a_name: {**entry, "shape": [4.0, 64]}}, b"\0" * size, None, "non-integer"),
        "not-an-object": ([1, 2], b"", None, "not a JSON object"),
    }
    for name, (header, data, length, message) in cases.items():
        variant(base, f"header-{name}")
        header_file(base / "adapters" / f"header-{name}" / "adapter_model.safetensors", header, data, length)
        with pytest.raises(AdapterError, match=f"cannot be read: .*{message}"):
            read(base, f"header-{name}")


def test_an_oversized_config_is_not_read_whole(base):
    variant(base, "big-config")
    path = base / "adapters" / "big-config" / "adapter_config.json"
    path.write_text(json.dumps({"r": 4, "padding": "x" * (2 << 20)}))
    with pytest.raises(AdapterError, match="adapter_config.json is over 1 MiB"):
        read(base, "big-config")
