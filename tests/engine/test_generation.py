"""Sampling and finishing: greedy, seeded temperature/top-k/top-p, stop strings, EOS, max_new_tokens."""
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request, SamplingParams
from engine.sampling import sample_next_tokens
from engine.sequence import Sequence


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
        seen.update(sample_next_tokens(logits, [seq]))
    assert seen == {0, 1}


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-6])
def test_a_tiny_temperature_samples_the_top_token(temperature):
    logits = torch.tensor([[0.5, 2.0, 1.9, -3.0]])
    seq = Sequence(Request("x", None, prompt_token_ids=[1], sampling=SamplingParams(temperature=temperature)),
                   [1], 4, 0)
    assert sample_next_tokens(logits, [seq]) == [1]


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
