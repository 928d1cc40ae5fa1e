"""Overlapped steps (the host reads step N's tokens and schedules N + 1 while N + 1 runs, feeding it the
device's own tokens) give the outputs of the plain loop, under preemption, adapter swaps, stop strings,
EOS, sampled rows, log-probs and scored rows alike. On CPU the "device" runs each step at once; what is
checked is the bookkeeping: tokens read one step late, rows finished while their next step is in flight."""
from dataclasses import replace

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request, SamplingParams
from tests.oracle import mixed_requests


def night(adapter_ids: list[str], new_tokens: int) -> list[Request]:
    """Greedy and sampled rows of every adapter, some with stop strings or log-probs, and scored rows."""
    requests = mixed_requests(adapter_ids, 30, new_tokens, seed=11)
    for i, r in enumerate(requests):
        if i % 3 == 1:
            r.sampling = SamplingParams(max_new_tokens=new_tokens - i % 5, temperature=0.9, top_p=0.95, top_k=40,
                                        seed=i)
        if i % 4 == 2:
            r.logprobs = 2
        if i % 7 == 3:
            r.sampling = replace(r.sampling, stop=["w1", "w7"])
    scored = [Request(f"q{i}", adapter, prompt_token_ids=[5, 9, 13, 21], continuation_token_ids=[7 + i, 30],
                      sampling=SamplingParams(max_new_tokens=1))
              for i, adapter in enumerate([None, *adapter_ids[:3]])]
    return requests + scored


def outputs(fleet, requests, **config) -> tuple[dict, Engine]:
    engine = Engine(EngineConfig(model=str(fleet.model), adapters=str(fleet.adapters), cpu_pool_bytes=16 << 20,
                                 **config))
    try:
        return {o.request_id: o for o in engine.generate(requests)}, engine
    finally:
        engine.close()


@pytest.mark.parametrize("tight,new_tokens", [
    # 60 pages of 16 tokens: the rank-64 adapter alone takes 44, so KV runs out while sequences grow
    pytest.param(dict(num_pages=60, max_resident_adapters=8), 40, id="preemption"),
    pytest.param(dict(max_active_adapters=1, max_resident_adapters=1, max_num_seqs=4), 14, id="adapter-swaps"),
])
def test_overlapped_steps_give_the_plain_outputs(llama_fleet, tight, new_tokens):
    requests = night(llama_fleet.adapter_ids, new_tokens)
    plain, plain_engine = outputs(llama_fleet, requests, overlap_steps=False, **tight)
    overlapped, engine = outputs(llama_fleet, requests, overlap_steps=True, **tight)
    exact = ("output_token_ids", "finish_reason", "error", "output_text", "continuation_tokens", "is_greedy")
    assert {rid: [getattr(o, f) for f in exact] for rid, o in overlapped.items()} == \
        {rid: [getattr(o, f) for f in exact] for rid, o in plain.items()}
    # log-probs as float32 computes them: batches of other shapes (a wasted row or two) move the last bits
    for rid, o in plain.items():
        assert o.token_logprobs == pytest.approx(overlapped[rid].token_logprobs, abs=1e-4)
        assert o.continuation_logprob == pytest.approx(overlapped[rid].continuation_logprob, abs=1e-4)
    assert not any(o.error for o in plain.values())
    assert {o.finish_reason for o in plain.values()} == {"stop", "length", "scored"}
    assert sum(o.token_logprobs is not None for o in plain.values()) >= 7
    assert engine.stats.output_tokens == plain_engine.stats.output_tokens
    if "num_pages" in tight:
        assert engine.scheduler.preemptions > 0
    else:
        assert engine.stats.adapter_loads > len(llama_fleet.adapter_ids)
    assert engine.in_flight is None and not len(engine.scheduler.running)
