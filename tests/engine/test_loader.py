"""Checkpoint loading: sharded safetensors, fsspec URLs, Mistral, the tokenizer's EOS ids."""
import fsspec
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import load_model
from engine.request import Request, SamplingParams
from engine.tokenizer import Tokenizer
from tests.checkpoints import build_checkpoint


def copy_to_memory(local_dir, url):
    fs = fsspec.filesystem("memory")
    for path in local_dir.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{url.removeprefix('memory://')}/{path.relative_to(local_dir)}", path.read_bytes())


def greedy(model_url, prompt=(5, 6, 7, 8)):
    engine = Engine(EngineConfig(model=model_url, cpu_pool_bytes=8 << 20))
    return next(iter(engine.generate([Request("x", None, prompt_token_ids=list(prompt),
                                                sampling=SamplingParams(max_new_tokens=6))]))).output_token_ids


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    from transformers import AutoModelForCausalLM
    single = build_checkpoint(tmp_path / "single", "qwen2")
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((single / name).read_bytes())
    a = load_model(str(single), torch.float32, "cpu").state_dict()
    b = load_model(str(tmp_path / "sharded"), torch.float32, "cpu").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_on_a_memory_url_generates_like_local(tmp_path):
    local = build_checkpoint(tmp_path / "m", "llama")
    copy_to_memory(local, "memory://ckpt/m")
    assert greedy("memory://ckpt/m") == greedy(str(local))


def test_mistral_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    path = build_checkpoint(tmp_path / "mistral", "mistral")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = hf.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 4:].tolist()
    assert greedy(str(path)) == expected


def test_tokenizer_reads_word_level_json_and_eos_from_configs(tmp_path):
    path = build_checkpoint(tmp_path / "tok", "llama")
    (path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    tok = Tokenizer(str(path))
    assert tok.encode("w0 w1") == [1, 4, 5]          # BOS from tokenizer_config, then the words
    assert tok.decode([1, 4, 5, 2]) == "w0 w1"
    assert tok.eos_token_ids == {2, 7}
