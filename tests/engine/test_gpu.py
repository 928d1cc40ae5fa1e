"""The engine on a GPU (skipped without one): Triton kernels, CUDA-graph decode, side-stream adapter loads.

float32 greedy tokens on the GPU must equal the CPU path's (torch references), with and without graphs;
bf16 logits stay close to float32 ones.
"""
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sequence import Sequence
from tests.oracle import RELOAD_EVERY_SWITCH, generated_tokens, mixed_requests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = dict(device="cuda", num_pages=512)   # a fixed pool: the default takes most of the free GPU memory


def make_engine(fleet, **overrides) -> Engine:
    return Engine(EngineConfig(model=str(fleet.model), adapters=str(fleet.adapters), **overrides))


def greedy_tokens(fleet, requests, **overrides) -> tuple[dict, Engine]:
    engine = make_engine(fleet, **overrides)
    return generated_tokens(engine, requests), engine


def test_float32_greedy_on_the_gpu_matches_the_cpu_path(fleet):
    requests = mixed_requests(fleet.adapter_ids, 24, 12, seed=5)
    cpu, _ = greedy_tokens(fleet, requests, cpu_pool_bytes=16 << 20)
    for graphs in (True, False):
        gpu, engine = greedy_tokens(fleet, requests, cuda_graphs=graphs, max_num_seqs=16, **GPU)
        assert (engine.runner.graphs is not None) == graphs
        assert gpu == cpu, f"cuda_graphs={graphs}"


def test_adapters_swapped_on_the_side_stream_change_no_output(llama_fleet):
    """One resident adapter: nearly every adapter row reloads its adapter on the side stream."""
    requests = mixed_requests(llama_fleet.adapter_ids, 30, 8, seed=6)
    roomy, _ = greedy_tokens(llama_fleet, requests, **GPU)
    tight, tight_engine = greedy_tokens(llama_fleet, requests, **RELOAD_EVERY_SWITCH, **GPU)
    assert tight == roomy
    assert tight_engine.stats.adapter_loads >= 20      # 25 adapter rows, 5 adapters: reloaded, not loaded once


def prefill_logits(engine: Engine, requests) -> torch.Tensor:
    seqs = [Sequence(r, r.prompt_token_ids, 4, 0) for r in requests]
    for seq in seqs:
        if seq.adapter_id:
            engine.scheduler._make_resident(seq.adapter_id, set())
        engine.runner.pool.allocate_kv(seq)
    logits, _ = engine.runner.prefill_logits(seqs)
    engine.close()
    return logits


def test_bf16_logits_stay_close_to_float32(llama_fleet):
    requests = mixed_requests(llama_fleet.adapter_ids, 10, 4, seed=7)
    exact = prefill_logits(make_engine(llama_fleet, **GPU), requests)
    bf16 = prefill_logits(make_engine(llama_fleet, dtype="bfloat16", **GPU), requests)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    similarity = torch.nn.functional.cosine_similarity(bf16, exact, dim=-1)
    assert similarity.min() > 0.99, similarity
