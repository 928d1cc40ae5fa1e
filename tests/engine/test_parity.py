"""The engine against the oracle: transformers + PEFT generating mixed-adapter batches (adapter_names=).

Greedy tokens must match exactly; last-position logits within atol 1e-4 / rtol 1e-4 in float32.
"""
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request, SamplingParams
from engine.sequence import Sequence
from tests.oracle import RELOAD_EVERY_SWITCH, generated_tokens, load_oracle, oracle_generate
from tests.oracle import mixed_requests as make_requests

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def oracle(fleet):
    return load_oracle(fleet.model, fleet.adapters, fleet.adapter_ids)


def mixed_requests(adapter_ids, n, seed=0):
    return make_requests(adapter_ids, n, NEW_TOKENS, seed)


def make_engine(fleet, **overrides) -> Engine:
    return Engine(EngineConfig(model=str(fleet.model), adapters=str(fleet.adapters), cpu_pool_bytes=16 << 20,
                               **overrides))


def test_greedy_tokens_match_peft_mixed_batch(fleet, oracle):
    requests = mixed_requests(fleet.adapter_ids, 18)
    expected = oracle_generate(oracle, requests, NEW_TOKENS)
    engine = make_engine(fleet, max_active_adapters=3, max_num_seqs=7)
    outputs = {o.request_id: o for o in engine.generate(requests)}
    assert all(o.error is None for o in outputs.values())
    for request, tokens in zip(requests, expected):
        assert outputs[request.request_id].output_token_ids == tokens, (request.request_id, request.adapter_id)
    assert engine.stats.adapter_loads >= len(fleet.adapter_ids)
    assert engine.stats.mean_adapters_per_decode_step <= 3


def test_last_position_logits_close_to_peft(fleet, oracle):
    requests = mixed_requests(fleet.adapter_ids, 6, seed=1)
    engine = make_engine(fleet)
    seqs = [Sequence(r, r.prompt_token_ids, NEW_TOKENS, 0) for r in requests]
    for seq in seqs:
        if seq.adapter_id:
            engine.scheduler._make_resident(seq.adapter_id, set())
        engine.runner.pool.allocate_kv(seq)
    logits, _ = engine.runner.prefill_logits(seqs)
    for seq, row in zip(seqs, logits):
        with torch.no_grad():
            ids = torch.tensor([seq.token_ids])
            ref = oracle(input_ids=ids, adapter_names=[seq.adapter_id or "__base__"]).logits[0, -1]
        torch.testing.assert_close(row, ref.float(), atol=1e-4, rtol=1e-4)


def test_one_request_alone_equals_it_inside_a_large_mixed_batch(llama_fleet):
    sampled = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.9, top_k=30, seed=7)
    crowd = mixed_requests(llama_fleet.adapter_ids, 40, seed=3)
    for i, r in enumerate(crowd[::3]):   # a third of the crowd samples too, with other seeds
        r.sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=100 + i)
    for params in (SamplingParams(max_new_tokens=NEW_TOKENS), sampled):
        probe = Request("probe", "r16-all-rs", prompt_token_ids=[5, 17, 33, 8, 91, 40], sampling=params)
        alone = next(iter(make_engine(llama_fleet).generate([probe])))
        together = {o.request_id: o for o in make_engine(llama_fleet, max_active_adapters=4).generate(crowd + [probe])}
        assert together["probe"].output_token_ids == alone.output_token_ids


def test_kv_exhaustion_preempts_and_recomputes_without_changing_outputs(llama_fleet):
    requests = mixed_requests(llama_fleet.adapter_ids, 16, seed=5)
    for i, r in enumerate(requests):
        r.sampling = SamplingParams(max_new_tokens=40, temperature=0.8 if i % 2 else 0.0, seed=i)
    roomy = {o.request_id: o.output_token_ids for o in make_engine(llama_fleet).generate(requests)}
    # 60 pages of 16 tokens: the rank-64 adapter alone takes 44, so KV runs out while sequences grow.
    tight = make_engine(llama_fleet, num_pages=60, max_resident_adapters=8)
    cramped = {o.request_id: o for o in tight.generate(requests)}
    assert tight.scheduler.preemptions > 0
    assert all(o.error is None for o in cramped.values())
    assert {rid: o.output_token_ids for rid, o in cramped.items()} == roomy


def test_unknown_adapter_fails_only_its_rows(llama_fleet):
    requests = mixed_requests(llama_fleet.adapter_ids, 8)
    requests[2].adapter_id = requests[5].adapter_id = "no-such-adapter"
    outputs = {o.request_id: o for o in make_engine(llama_fleet).generate(requests)}
    assert {rid for rid, o in outputs.items() if o.finish_reason == "error"} == {"r2", "r5"}
    assert "not found" in outputs["r2"].error
    assert all(o.output_tokens > 0 for rid, o in outputs.items() if rid not in ("r2", "r5"))


def test_out_of_memory_splits_batches_and_fails_only_what_cannot_fit(llama_fleet, monkeypatch):
    requests = mixed_requests(llama_fleet.adapter_ids, 12, seed=8)
    requests[4].prompt_token_ids = [7] * 30            # this one runs out of memory even alone
    expected = {o.request_id: o.output_token_ids for o in make_engine(llama_fleet).generate(requests)}
    engine = make_engine(llama_fleet)
    real_run = engine.runner.run

    def small_device(seqs, *args):
        if len(seqs) > 3 or sum(s.num_tokens for s in seqs) >= 30:
            raise torch.OutOfMemoryError("simulated")
        return real_run(seqs, *args)

    monkeypatch.setattr(engine.runner, "run", small_device)
    outputs = {o.request_id: o for o in engine.generate(requests)}
    assert "out of device memory" in outputs["r4"].error
    assert {rid: o.output_token_ids for rid, o in outputs.items() if rid != "r4"} == \
        {rid: tokens for rid, tokens in expected.items() if rid != "r4"}
    assert engine.scheduler.max_num_seqs <= 3


def test_idle_adapters_are_evicted_before_any_request_is_preempted(llama_fleet):
    engine = make_engine(llama_fleet, num_pages=50)           # the rank-64 adapter alone takes 44 pages
    engine.scheduler._make_resident("r64-mlp-o", set())        # resident but idle: no request uses it
    engine.tokenizer.eos_token_ids = set()                     # run to max_new_tokens
    request = Request("long", None, prompt_token_ids=list(range(4, 24)),
                      sampling=SamplingParams(max_new_tokens=100))   # grows to 8 KV pages: more than are free
    (output,) = list(engine.generate([request]))
    assert output.output_tokens == 100 and output.error is None
    assert "r64-mlp-o" not in engine.runner.adapters.resident and engine.scheduler.preemptions == 0


def test_adapters_reloaded_at_every_switch_change_no_output(llama_fleet):
    requests = make_requests(llama_fleet.adapter_ids, 30, 4, seed=6)
    roomy = generated_tokens(make_engine(llama_fleet), requests)
    tight_engine = make_engine(llama_fleet, **RELOAD_EVERY_SWITCH)
    assert generated_tokens(tight_engine, requests) == roomy
    assert tight_engine.stats.adapter_loads >= 20      # 25 adapter rows, 5 adapters: reloaded, not loaded once
