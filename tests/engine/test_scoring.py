"""Scored requests and logprobs against the oracle: transformers + PEFT's float32 log-softmax, gathered at the
continuation's tokens (or the generated ones), on mixed-adapter batches of both architectures.

Sums within 1e-4, is_greedy equal, top-N alternatives equal up to ties; the same numbers (to float32 rounding,
1e-5: a row's matmuls depend on the batch's shape) alone, in a crowd, and with prefix sharing off.
"""
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request, SamplingParams
from tests.oracle import load_oracle, oracle_generate

ATOL = 1e-4
SAME = 1e-5          # one row in different batches, or with sharing on and off
TOP_N = 4


@pytest.fixture(scope="module")
def oracle(fleet):
    return load_oracle(fleet.model, fleet.adapters, fleet.adapter_ids)


def make_engine(fleet, **overrides) -> Engine:
    return Engine(EngineConfig(model=str(fleet.model), adapters=str(fleet.adapters), cpu_pool_bytes=16 << 20,
                               **overrides))


def oracle_logprobs(oracle, adapter_id, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """[len(continuation), vocab] float32 log-softmax at the positions predicting each continuation token."""
    with torch.no_grad():
        logits = oracle(input_ids=torch.tensor([prompt + continuation]),
                        adapter_names=[adapter_id or "__base__"]).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)


def assert_top_equal_up_to_ties(top: list[dict], expected: torch.Tensor) -> None:
    """top: the engine's alternatives of one token; expected: the oracle's log-probs over the vocabulary."""
    values, ids = expected.topk(len(top))
    assert [a["logprob"] for a in top] == pytest.approx(values.tolist(), abs=ATOL)
    for a, token_id, value in zip(top, ids.tolist(), values.tolist()):
        if a["token_id"] != token_id:   # only where another token is (numerically) as likely
            assert abs(expected[a["token_id"]].item() - value) < SAME


def question_requests(adapter_ids, seed=0) -> list[Request]:
    """Per adapter (and the base), a 4-choice question on a long prompt (shared pages) and a short one (none),
    and a lone scored row; every other row asks for logprobs."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(4, 124, (n,), generator=g).tolist()   # noqa: E731
    requests = []
    for a in [None] + adapter_ids:
        for q, prompt_len in enumerate((37, 5)):
            prompt = rand(prompt_len)
            requests += [Request(f"{a}/q{q}/{c}", a, prompt_token_ids=prompt, continuation_token_ids=rand(1 + c),
                                 logprobs=TOP_N if c % 2 else None) for c in range(4)]
        requests.append(Request(f"{a}/lone", a, prompt_token_ids=rand(9), continuation_token_ids=rand(6), logprobs=0))
    return requests


def greedy_requests(oracle, adapter_ids) -> list[Request]:
    """Continuations that are the oracle's own greedy tokens: is_greedy must come out True."""
    prompts = [[5, 9, 77, 31], list(range(20, 60))]
    base = [Request(f"g{i}", adapter_ids[i % len(adapter_ids)], prompt_token_ids=p,
                    sampling=SamplingParams(max_new_tokens=5)) for i, p in enumerate(prompts)]
    return [Request(f"greedy/{r.request_id}", r.adapter_id, prompt_token_ids=r.prompt_token_ids,
                    continuation_token_ids=tokens) for r, tokens in zip(base, oracle_generate(oracle, base, 5))]


def check_against_oracle(oracle, request: Request, output) -> None:
    assert output.error is None and output.finish_reason == "scored", output.error
    continuation = request.continuation_token_ids
    expected = oracle_logprobs(oracle, request.adapter_id, request.prompt_token_ids, continuation)
    gathered = expected.gather(1, torch.tensor(continuation)[:, None]).squeeze(1)
    assert output.continuation_logprob == pytest.approx(gathered.double().sum().item(), abs=ATOL)
    assert output.is_greedy == bool((expected.argmax(-1) == torch.tensor(continuation)).all())
    assert output.continuation_tokens == output.output_tokens == len(continuation)
    assert output.output_token_ids == continuation and output.prompt_tokens == len(request.prompt_token_ids)
    if request.logprobs is None:
        assert output.token_logprobs is None and output.top_logprobs is None
        return
    assert output.token_logprobs == pytest.approx(gathered.tolist(), abs=ATOL)
    assert [len(top) for top in output.top_logprobs] == [request.logprobs] * len(continuation)
    for top, row in zip(output.top_logprobs, expected):
        assert_top_equal_up_to_ties(top, row)
        assert all(a["token"] == f"w{a['token_id'] - 4}" for a in top if a["token_id"] >= 4)


def test_scored_rows_match_peft(fleet, oracle):
    requests = question_requests(fleet.adapter_ids) + greedy_requests(oracle, fleet.adapter_ids)
    engine = make_engine(fleet, max_active_adapters=3, max_num_seqs=11)
    outputs = {o.request_id: o for o in engine.generate(requests)}
    for request in requests:
        check_against_oracle(oracle, request, outputs[request.request_id])
    assert all(outputs[r.request_id].is_greedy for r in requests if r.request_id.startswith("greedy/"))
    assert engine.stats.decode_steps == 0 and engine.stats.output_tokens == 0
    assert engine.stats.prefill_tokens_computed < engine.stats.prefill_tokens_requested   # the 37-token prompts
    # no KV is kept: the pages still in use are the resident adapters'
    pool, adapters = engine.runner.pool, engine.runner.adapters
    assert len(pool.used) == adapters.pages_held(list(adapters.resident))


def test_generated_logprobs_match_peft_in_a_batch_with_scored_rows(fleet, oracle):
    generating = [Request(f"gen{i}", a, prompt_token_ids=list(range(7 + i, 20 + 2 * i)), logprobs=n,
                          sampling=SamplingParams(max_new_tokens=6))
                  for i, (a, n) in enumerate([(None, 3), (fleet.adapter_ids[2], 0), (fleet.adapter_ids[3], None)])]
    sampled = Request("sampled", fleet.adapter_ids[1], prompt_token_ids=[9, 8, 7, 6], logprobs=2,
                      sampling=SamplingParams(max_new_tokens=6, temperature=1.3, top_k=5, seed=3))
    requests = question_requests(fleet.adapter_ids[1:3], seed=1) + generating + [sampled]
    outputs = {o.request_id: o for o in make_engine(fleet, max_num_seqs=40).generate(requests)}
    assert [outputs[r.request_id].output_token_ids for r in generating] == oracle_generate(oracle, generating, 6)
    for request in generating + [sampled]:
        out = outputs[request.request_id]
        assert out.finish_reason in ("stop", "length") and out.continuation_logprob is None
        if request.logprobs is None:
            assert out.token_logprobs is None and out.top_logprobs is None
            continue
        # the raw distribution: what the model gives each generated token, whatever the sampling settings
        expected = oracle_logprobs(oracle, request.adapter_id, request.prompt_token_ids, out.output_token_ids)
        tokens = torch.tensor(out.output_token_ids)
        assert out.token_logprobs == pytest.approx(expected.gather(1, tokens[:, None]).squeeze(1).tolist(), abs=ATOL)
        for top, row in zip(out.top_logprobs, expected):
            assert len(top) == request.logprobs
            assert_top_equal_up_to_ties(top, row)
    for request in requests[:-4]:
        check_against_oracle(oracle, request, outputs[request.request_id])


def numbers(output) -> tuple:
    return output.continuation_logprob, output.is_greedy, output.token_logprobs


def assert_same_numbers(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        (sum_a, greedy_a, tokens_a), (sum_b, greedy_b, tokens_b) = numbers(a[rid]), numbers(b[rid])
        assert sum_a == pytest.approx(sum_b, abs=SAME) and greedy_a == greedy_b, rid
        assert tokens_a == tokens_b or tokens_a == pytest.approx(tokens_b, abs=SAME), rid


def test_numbers_do_not_depend_on_batch_or_prefix_sharing(llama_fleet):
    requests = question_requests(llama_fleet.adapter_ids, seed=2)
    crowd = {o.request_id: o for o in make_engine(llama_fleet, max_active_adapters=4).generate(requests)}
    alone = {}
    for request in requests[::5]:
        alone.update({o.request_id: o for o in make_engine(llama_fleet).generate([request])})
    assert_same_numbers(alone, {rid: crowd[rid] for rid in alone})
    unshared_engine = make_engine(llama_fleet, prefix_sharing=False, max_num_seqs=3)
    unshared = {o.request_id: o for o in unshared_engine.generate(requests)}
    assert_same_numbers(crowd, unshared)
    assert unshared_engine.stats.prefill_tokens_computed == unshared_engine.stats.prefill_tokens_requested


@pytest.mark.parametrize("max_num_seqs", [8, 1])   # the 4 choices in one batch; each in a batch of its own
def test_four_choices_cost_at_most_one_and_a_half_prefills_of_one(llama_fleet, max_num_seqs):
    prompt = list(range(10, 110))
    choices = [[5], [6, 7], [8, 9, 10], [11, 12]]
    requests = [Request(f"c{i}", "r8-qv", prompt_token_ids=prompt, continuation_token_ids=c)
                for i, c in enumerate(choices)]
    engine = make_engine(llama_fleet, max_num_seqs=max_num_seqs)
    outputs = list(engine.generate(requests))
    one_choice = len(prompt) + max(len(c) for c in choices)
    assert engine.stats.prefill_tokens_requested == sum(len(prompt) + len(c) for c in choices)
    assert engine.stats.prefill_tokens_computed <= 1.5 * one_choice
    assert all(o.error is None for o in outputs)


def test_pages_of_a_batch_that_ran_out_of_memory_are_not_shared_later(llama_fleet, monkeypatch):
    requests = question_requests(["r16-all-rs"], seed=3)
    expected = {o.request_id: o for o in make_engine(llama_fleet).generate(requests)}
    engine = make_engine(llama_fleet)
    real_run = engine.runner.run
    failures = iter([True, True])

    def flaky_device(seqs, rows, decode_inputs, sampling):
        if decode_inputs is None and next(failures, False):     # a prefill
            raise torch.OutOfMemoryError("simulated")
        return real_run(seqs, rows, decode_inputs, sampling)

    monkeypatch.setattr(engine.runner, "run", flaky_device)
    assert_same_numbers(expected, {o.request_id: o for o in engine.generate(requests)})
    assert engine.stats.prefill_tokens_computed < engine.stats.prefill_tokens_requested


def test_bad_scored_requests_fail_alone(llama_fleet):
    engine = make_engine(llama_fleet, max_model_len=40)
    requests = [Request("empty-ids", None, prompt_token_ids=[5, 6], continuation_token_ids=[]),
                Request("empty-text", None, prompt="w1 w2", continuation=""),
                Request("vocab", "r1-q", prompt_token_ids=[5, 6], continuation_token_ids=[5, 10_000]),
                Request("too-long", None, prompt_token_ids=list(range(4, 40)), continuation_token_ids=[5] * 5),
                Request("fits", None, prompt_token_ids=list(range(4, 38)), continuation_token_ids=[5] * 6)]
    outputs = {o.request_id: o for o in engine.generate(requests)}
    assert "continuation encodes to no tokens" in outputs["empty-ids"].error
    assert "continuation encodes to no tokens" in outputs["empty-text"].error
    assert "outside the vocabulary" in outputs["vocab"].error
    assert "prompt + continuation have 41 tokens; the context allows 40" in outputs["too-long"].error
    assert outputs["fits"].finish_reason == "scored" and outputs["fits"].continuation_tokens == 6
    assert all(o.continuation_logprob is None for rid, o in outputs.items() if rid != "fits")


def test_text_pairs_split_as_the_harness_does(llama_fleet):
    tok = make_engine(llama_fleet).tokenizer
    w = {f"w{i}": i + 4 for i in range(120)}
    assert tok.encode_pair("w1 w2 ", "w3 w4") == ([1, w["w1"], w["w2"]], [w["w3"], w["w4"]])  # space moves over
    assert tok.encode_pair("w1", " w3") == ([1, w["w1"]], [w["w3"]])
    assert tok.encode_pair("", "w3 w4") == ([1], [w["w3"], w["w4"]])       # empty context: the prefix token
    assert tok.encode_pair("w1", "") == ([1, w["w1"]], [])


def test_text_and_id_forms_of_one_question_score_alike(llama_fleet):
    forms = [Request("text", "r4-regex-kv", prompt="w1 w2 w3 ", continuation="w4 w5"),
             Request("ids", "r4-regex-kv", prompt_token_ids=[1, 5, 6, 7], continuation_token_ids=[8, 9]),
             Request("ids+text", "r4-regex-kv", prompt_token_ids=[1, 5, 6, 7], continuation=" w4 w5"),
             Request("text+ids", "r4-regex-kv", prompt="w1 w2 w3", continuation_token_ids=[8, 9])]
    outputs = {o.request_id: o for o in make_engine(llama_fleet).generate(forms)}
    assert {o.continuation_logprob for o in outputs.values()} == {outputs["ids"].continuation_logprob}
    assert outputs["text"].output_text == "w4 w5" and outputs["ids"].output_text == "w4 w5"   # as given, or decoded
    assert all(o.output_token_ids == [8, 9] and o.prompt_tokens == 4 for o in outputs.values())


def test_triton_kernels_score_as_the_references_do(llama_fleet):
    """The paged prefill kernel after shared pages, and the rest of the Triton set, under the interpreter."""
    requests = question_requests(["r8-qv"], seed=4)[:10]
    by_kernels = {kernels: {o.request_id: o for o in make_engine(llama_fleet, kernels=kernels).generate(requests)}
                  for kernels in ("torch", "triton")}
    for rid, out in by_kernels["torch"].items():
        assert by_kernels["triton"][rid].continuation_logprob == pytest.approx(out.continuation_logprob, abs=ATOL)
        assert by_kernels["triton"][rid].is_greedy == out.is_greedy
