"""Sampling and finishing: greedy, seeded temperature/top-k/top-p, stop strings, EOS, max_new_tokens."""
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request, SamplingParams
from engine.sequence import Sequence
from tests.checkpoints import write_peft_adapter
from tests.engine.test_sampling import sample_sequences


@pytest.fixture(scope="module")
def engine(llama_fleet):
    return Engine(EngineConfig(model=str(llama_fleet.model), adapters=str(llama_fleet.adapters),
                               cpu_pool_bytes=16 << 20))


def run(engine, *requests):
    return {o.request_id: o for o in engine.generate(list(requests))}


def test_seeded_sampling_repeats_and_seeds_differ(engine):
    params = dict(max_new_tokens=12, temperature=1.5)
    out = run(engine, *(Request(f"s{seed}-{k}", "r8-qv", prompt="w1 w2 w3",
                                sampling=SamplingParams(seed=seed, **params)) for seed in (1, 2) for k in range(2)))
    assert out["s1-0"].output_token_ids == out["s1-1"].output_token_ids
    assert out["s1-0"].output_token_ids != out["s2-0"].output_token_ids


def test_top_k_one_is_greedy(engine):
    out = run(engine, Request("g", None, prompt="w5 w6", sampling=SamplingParams(max_new_tokens=8)),
              Request("k", None, prompt="w5 w6", sampling=SamplingParams(max_new_tokens=8, temperature=2.0, top_k=1)))
    assert out["g"].output_token_ids == out["k"].output_token_ids


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for seed in range(200):
        seq = Sequence(Request("x", None, prompt_token_ids=[1],
                               sampling=SamplingParams(temperature=1.0, top_p=0.7)), [1], 4, seed)
        seen.update(sample_sequences(logits, [seq]))
    assert seen == {0, 1}


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_a_tiny_temperature_samples_the_top_token(temperature):
    logits = torch.tensor([[0.5, 2.0, 1.9, -3.0]])
    seq = Sequence(Request("x", None, prompt_token_ids=[1], sampling=SamplingParams(temperature=temperature)),
                   [1], 4, 0)
    assert sample_sequences(logits, [seq]).tolist() == [1]


def test_stop_string_truncates_text_and_finishes(engine):
    free = run(engine, Request("free", "r1-q", prompt="w9 w8 w7", sampling=SamplingParams(max_new_tokens=8)))["free"]
    words = free.output_text.split()
    stop = words[2]
    out = run(engine, Request("stop", "r1-q", prompt="w9 w8 w7",
                              sampling=SamplingParams(max_new_tokens=8, stop=[stop, "never-appears"])))["stop"]
    assert out.finish_reason == "stop"
    assert out.output_text == free.output_text[: free.output_text.find(stop)]
    assert out.output_token_ids == free.output_token_ids[: len(out.output_token_ids)]


def test_eos_finishes_with_stop_and_length_otherwise(engine):
    eos = 2
    engine.tokenizer.eos_token_ids = {eos}
    outs = run(engine, *(Request(f"r{i}", None, prompt_token_ids=[4 + i, 9, 11 + i],
                                 sampling=SamplingParams(max_new_tokens=30)) for i in range(40)))
    stopped = [o for o in outs.values() if o.finish_reason == "stop"]
    assert stopped and all(o.output_token_ids[-1] == eos and eos not in o.output_token_ids[:-1] for o in stopped)
    assert all(o.output_tokens == 30 and eos not in o.output_token_ids
               for o in outs.values() if o.finish_reason == "length")


def test_prompt_checks_become_error_outputs(engine):
    long_prompt = [5] * engine.max_model_len
    out = run(engine, Request("long", None, prompt_token_ids=long_prompt),
              Request("oov", None, prompt_token_ids=[5, 10_000]),
              Request("empty", None, prompt=""),
              Request("capped", None, prompt_token_ids=[5] * (engine.max_model_len - 3),
                      sampling=SamplingParams(max_new_tokens=50)))
    assert "context allows" in out["long"].error and "outside the vocabulary" in out["oov"].error
    assert "empty prompt" in out["empty"].error
    assert out["capped"].output_tokens == 3 and out["capped"].finish_reason in ("length", "stop")


def test_rows_whose_logits_are_not_finite_fail_alone(llama_fleet, tmp_path):
    """An adapter with finite weights too large for float32 (no load-time check can refuse it) makes its rows'
    logits NaN: those rows fail, greedy and sampled alike, and every other row comes out as without them."""
    for name, std in (("huge", 1e25), ("fine", 0.2)):
        write_peft_adapter(tmp_path / name, 64, 128, 2, 32, rank=4, targets=["q_proj", "down_proj"], alpha=8,
                           seed=3, init_std=std)
    engine = Engine(EngineConfig(model=str(llama_fleet.model), adapters=str(tmp_path), cpu_pool_bytes=16 << 20))
    sampled = dict(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=4)
    good = [Request(f"{a}-{kind}", a, prompt_token_ids=[5, 9, 14], sampling=SamplingParams(**params))
            for a in (None, "fine") for kind, params in (("greedy", dict(max_new_tokens=6)), ("sampled", sampled))]
    bad = [Request("huge-greedy", "huge", prompt_token_ids=[5, 9]),
           Request("huge-sampled", "huge", prompt_token_ids=[7, 9, 2], sampling=SamplingParams(**sampled),
                   logprobs=2),                          # no log-probs to record for a row that fails
           Request("huge-scored", "huge", prompt_token_ids=[7, 9], continuation_token_ids=[3, 4])]
    alone = run(engine, *good)
    mixed = run(engine, *(good[:2] + bad + good[2:]))
    for request in bad:
        out = mixed[request.request_id]
        assert out.finish_reason == "error" and out.output_token_ids == []
        where = "scoring its continuation" if request.continuation_token_ids else "at output token 1"
        assert f"non-finite logits (NaN or Inf) {where}: adapter 'huge'" in out.error
    assert {rid: o.output_token_ids for rid, o in mixed.items() if not rid.startswith("huge")} == \
        {rid: o.output_token_ids for rid, o in alone.items()}
    assert all(o.error is None and o.output_tokens == 6 for o in alone.values())
