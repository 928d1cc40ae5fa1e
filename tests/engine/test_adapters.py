"""Adapter validation: what PEFT can write that we refuse, each with a message that says why."""
import hashlib
import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file

import engine.adapters
from engine.adapter_config import configured_ranks
from engine.adapter_file import HostBuffers
from engine.adapters import AdapterError, AdapterStore, read_adapter
from engine.loader import load_model_args
from tests.checkpoints import build_adapter, build_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    build_checkpoint(root / "model", "llama")
    build_checkpoint(root / "wider", "llama", hidden=96, heads=4, kv_heads=2)
    return root


def read(base, adapter_id, root=None):
    args = load_model_args(str(base / "model"))
    return read_adapter(str(root or base / "adapters"), adapter_id, args, torch.float32, max_rank=64)


def test_reads_rank_alpha_rslora_and_targets(base):
    build_adapter(base / "adapters" / "ok", base / "model", rank=4, alpha=12, targets=["q_proj", "down_proj"],
                  use_rslora=True)
    weights = read(base, "ok")
    assert sorted({m for _, m in weights.modules}) == ["down_proj", "q_proj"]
    down = weights.modules[(1, "down_proj")]
    assert (down.rank, down.a.end - down.a.start, down.b.end - down.b.start) == (4, 4 * 128 * 4, 64 * 4 * 4)
    assert down.scale == pytest.approx(12 / 2)   # rsLoRA: alpha / sqrt(r)
    data = (base / "adapters" / "ok" / "adapter_model.safetensors").read_bytes()
    assert weights.sha256 == hashlib.sha256(data).hexdigest()   # of the whole file, computed while reading
    stored = load_file(base / "adapters" / "ok" / "adapter_model.safetensors")
    assert torch.equal(weights.tensor(down.b, (64, 4)), stored[down.b.name])


def test_rank_and_alpha_patterns_give_per_module_ranks(base):
    build_adapter(base / "adapters" / "patterns", base / "model", rank=4, alpha=8, targets=["q_proj", "v_proj"],
                  rank_pattern={"v_proj": 16}, alpha_pattern={"v_proj": 4})
    weights = read(base, "patterns")
    assert (weights.modules[(0, "q_proj")].rank, weights.modules[(0, "q_proj")].scale) == (4, 2.0)
    assert (weights.modules[(0, "v_proj")].rank, weights.modules[(0, "v_proj")].scale) == (16, 0.25)


@pytest.mark.parametrize("adapter_id, kwargs, message", [
    ("dora", dict(use_dora=True), "DoRA"),
    ("lm-head", dict(targets=["q_proj", "lm_head"]), "lm_head"),
    ("embed", dict(targets=["q_proj", "embed_tokens"]), "embed_tokens"),
    ("layers", dict(layers_to_transform=[0]), "layers_to_transform"),
    ("bias", dict(bias="lora_only"), "bias"),
])
def test_unsupported_features_are_refused(base, adapter_id, kwargs, message):
    build_adapter(base / "adapters" / adapter_id, base / "model", **kwargs)
    with pytest.raises(AdapterError, match=message):
        read(base, adapter_id)


def test_adapter_of_another_base_is_refused_by_shape(base):
    build_adapter(base / "adapters" / "wider", base / "wider")
    with pytest.raises(AdapterError, match="do not fit the base model"):
        read(base, "wider")


@pytest.mark.parametrize("adapter_id", ["../model", "/etc", "a/b", "", "x" * 129, ".hidden"])
def test_names_that_are_not_plain_never_touch_storage(base, adapter_id):
    with pytest.raises(AdapterError, match="not a plain name"):
        read(base, adapter_id)


def test_broken_directories(base):
    src = build_adapter(base / "adapters" / "good", base / "model")
    no_config = shutil.copytree(src, base / "adapters" / "no-config")
    (no_config / "adapter_config.json").unlink()
    pickle_only = shutil.copytree(src, base / "adapters" / "pickle-only")
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    truncated = shutil.copytree(src, base / "adapters" / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    bad_json = shutil.copytree(src, base / "adapters" / "bad-json")
    (bad_json / "adapter_config.json").write_text("{not json")
    for adapter_id, message in [("missing", "not found"), ("no-config", "no adapter_config.json"),
                                ("pickle-only", "never unpickled"), ("truncated", "cannot be read"),
                                ("bad-json", "cannot be read")]:
        with pytest.raises(AdapterError, match=message):
            read(base, adapter_id)


def test_rank_above_the_engine_limit_is_refused(base):
    build_adapter(base / "adapters" / "huge", base / "model", rank=96)
    with pytest.raises(AdapterError, match="exceeds"):
        read(base, "huge")


def store_over(base, prefix: str, count: int, cache_adapters: int) -> tuple[AdapterStore, int]:
    """`count` rank-8 adapters named prefix0.. and a store whose host cache holds `cache_adapters` of them."""
    for i in range(count):
        build_adapter(base / "adapters" / f"{prefix}{i}", base / "model", rank=8, seed=i)
    one = read(base, f"{prefix}0").nbytes
    return AdapterStore(str(base / "adapters"), load_model_args(str(base / "model")), torch.float32, 64,
                        host_cache_bytes=cache_adapters * one, pack=lambda weights: weights), one


def test_store_remembers_failures_and_evicts_by_bytes(base):
    store, _ = store_over(base, "lru", 3, cache_adapters=2)
    for i in range(3):
        store.get(f"lru{i}")
    assert list(store._cache) == ["lru1", "lru2"]   # lru0 evicted: the cache holds two adapters' bytes
    with pytest.raises(AdapterError):
        store.get("missing")
    (base / "adapters" / "missing").mkdir()        # the failure is remembered for the run: tried once
    with pytest.raises(AdapterError, match="not found"):
        store.get("missing")
    store.prefetch(["lru0"])
    assert store.get("lru0").adapter_id == "lru0" and store.reads == 4
    store.close()


def test_regex_target_modules_are_checked(base):
    build_adapter(base / "adapters" / "regex-head", base / "model", targets=r".*(q_proj|lm_head)")
    config = json.loads((base / "adapters" / "regex-head" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)
    with pytest.raises(AdapterError, match="lm_head"):
        read(base, "regex-head")


def test_ranks_known_from_the_config_equal_the_weights(base):
    """The planner sizes adapters from adapter_config.json alone; it must agree with the weights."""
    args = load_model_args(str(base / "model"))
    cases = {"cfg-list": dict(rank=4, targets=["q_proj", "down_proj"]),
             "cfg-regex": dict(rank=8, targets=r".*\.(k_proj|up_proj)"),
             "cfg-all": dict(rank=2, targets="all-linear"),
             "cfg-pattern": dict(rank=4, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 16})}
    for adapter_id, kwargs in cases.items():
        build_adapter(base / "adapters" / adapter_id, base / "model", **kwargs)
        config = json.loads((base / "adapters" / adapter_id / "adapter_config.json").read_text())
        weights = read(base, adapter_id)
        assert configured_ranks(config, args, 64) == {key: m.rank for key, m in weights.modules.items()}


def test_an_adapter_trained_on_another_base_is_refused_by_name(base):
    build_adapter(base / "adapters" / "named", base / "model", rank=4, targets=["q_proj"])
    config_path = base / "adapters" / "named" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    args = load_model_args(str(base / "model"))

    def read_as(base_model_name, adapter_base):
        config_path.write_text(json.dumps(dict(config, base_model_name_or_path=adapter_base)))
        return read_adapter(str(base / "adapters"), "named", args, torch.float32, 64,
                            base_model_name=base_model_name)

    assert read_as("/models/llama-2-7b-hf/", "meta-llama/Llama-2-7b-hf").adapter_id == "named"
    assert read_as(None, "Qwen/Qwen2-0.5B").adapter_id == "named"                      # no base name: no check
    assert read_as("meta-llama/Llama-2-7b-hf", None).adapter_id == "named"            # the adapter names none
    with pytest.raises(AdapterError, match="trained on 'Qwen/Qwen2-0.5B'.*'meta-llama/Llama-2-7b-hf'"):
        read_as("meta-llama/Llama-2-7b-hf", "Qwen/Qwen2-0.5B")


@pytest.mark.parametrize("name, edit, message", [
    ("config-null", lambda c: None, "not a JSON object"),
    ("bad-regex", lambda c: {**c, "target_modules": "(q_proj"}, "not a valid regular expression"),
    ("alpha-null", lambda c: {**c, "lora_alpha": None}, "lora_alpha must be a finite number"),
    ("targets-int", lambda c: {**c, "target_modules": 7}, "target_modules must be"),
    ("pattern-list", lambda c: {**c, "rank_pattern": ["v_proj"]}, "rank_pattern must be a JSON object"),
])
def test_malformed_configs_fail_the_adapter_not_the_run(base, name, edit, message):
    src = build_adapter(base / "adapters" / "good-2", base / "model")
    path = shutil.copytree(src, base / "adapters" / name) / "adapter_config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    store = AdapterStore(str(base / "adapters"), load_model_args(str(base / "model")), torch.float32, 64,
                         host_cache_bytes=1 << 30, pack=lambda weights: weights)
    with pytest.raises(AdapterError, match=message):
        store.get(name)
    store.close()


def test_read_ahead_is_bounded_by_host_bytes(base):
    store, one = store_over(base, "ahead", 6, cache_adapters=6)
    store.get("ahead0")                                   # now the store knows how big an adapter is
    assert store.reads == 1 and store.bytes_read == one and store.read_s > 0 and store.wait_s > 0
    store.prefetch([f"ahead{i}" for i in range(6)])
    assert list(store._ahead) == ["ahead1", "ahead2", "ahead3"]   # half of 6 adapters' bytes, in queue order
    for future in list(store._ahead.values()):
        future.result()
    store.prefetch(["ahead4"])                            # the queue moved on: finished reads join the LRU
    assert list(store._ahead) == ["ahead4"] and len(store._cache) == 4
    store._ahead["ahead4"].result()
    assert store.get("ahead2").adapter_id == "ahead2" and store.reads == 5
    store.close()


def test_a_read_still_queued_is_done_at_once_when_needed(base, monkeypatch):
    """The engine never waits for reads queued ahead of the adapter it needs now."""
    for i in range(3):
        build_adapter(base / "adapters" / f"queued{i}", base / "model", rank=2, seed=i)
    monkeypatch.setattr(engine.adapters.os, "cpu_count", lambda: 2)       # two reader threads
    gate = threading.Event()
    store = AdapterStore(str(base / "adapters"), load_model_args(str(base / "model")), torch.float32, 64,
                         host_cache_bytes=1 << 30,
                         pack=lambda file: (gate.wait(10) if file.adapter_id != "queued2" else None, file)[1])
    store.prefetch(["queued0", "queued1", "queued2"])     # both readers held up; queued2 waits in the queue
    assert store.get("queued2").adapter_id == "queued2" and not gate.is_set()
    gate.set()
    assert store.get("queued0").adapter_id == "queued0"
    store.close()


def test_host_buffers_are_reused_once_freed_and_kept_within_bounds():
    buffers = HostBuffers(keep_bytes=1000)
    first = buffers.take(600)
    pointer = first.data_ptr()
    del first                                             # the adapter holding it is gone
    again = buffers.take(500)                             # a buffer up to twice the size is reused
    assert again.data_ptr() == pointer and again.numel() == 500
    other = buffers.take(600)                             # none free: a new one
    other_pointer = other.data_ptr()
    assert other_pointer != pointer
    del again, other                                      # both come back, but only 1,000 bytes may wait
    held = buffers.take(301)                              # 600 is at most twice 301: reused
    assert held.data_ptr() in {pointer, other_pointer} and not buffers._free
