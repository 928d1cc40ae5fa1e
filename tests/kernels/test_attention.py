"""Paged decode and varlen causal prefill attention: references against a naive float64 softmax, Triton
kernels against the references, over head layouts (MHA, GQA, MQA), odd head dims, page sizes and lengths."""
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

import kernels.paged_attention as paged
from kernel_cases import DEVICE, DTYPES, TOLERANCES
from kernels import paged_attention_decode, paged_attention_decode_ref, prefill_attention, prefill_attention_ref

# (query heads, kv heads, head dim)
HEADS = [(4, 4, 32), (8, 2, 64), (6, 1, 40)]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [n_q, Hq, D], k/v [n, Hkv, D] -> [n_q, Hq, D] in float64; queries are the last n_q positions."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.3
    if causal:
        n_q, n = q.shape[0], k.shape[0]
        later = torch.arange(n)[None, :] > torch.arange(n - n_q, n)[:, None]
        scores = scores.masked_fill(later, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_decode_case(n_heads, n_kv_heads, head_dim, block_size, context_lens, dtype, seed=0):
    """q plus K/V caches as strided views of an engine-like pool [pages, layers, 2, block, Hkv, D]."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1
    n_pages = len(context_lens) * max_blocks + 3
    pool = torch.randn(n_pages, 2, 2, block_size, n_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    pages = torch.randperm(n_pages, generator=gen).tolist()
    block_tables = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    for b, n in enumerate(context_lens):
        for i in range(-(-n // block_size)):
            block_tables[b, i] = pages.pop()
    q = torch.randn(len(context_lens), n_heads, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k_cache, v_cache, block_tables.to(DEVICE), torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)


def naive_decode(q, k_cache, v_cache, block_tables, context_lens) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    block_size = k_cache.shape[1]
    for b, n in enumerate(context_lens.tolist()):
        slots = [(int(block_tables[b, p // block_size]), p % block_size) for p in range(n)]
        if slots:
            k = torch.stack([k_cache[page, i] for page, i in slots])
            v = torch.stack([v_cache[page, i] for page, i in slots])
            out[b] = naive_attention(q[b:b + 1], k, v, causal=False)[0]
    return out


CONTEXTS = [[1], [17, 64, 100, 3], [0, 5, 129]]     # 0 = a padding row of a CUDA-graph batch: output zeros


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("context_lens", CONTEXTS)
def test_decode_reference_matches_naive(context_lens, heads, block_size):
    case = make_decode_case(*heads, block_size, context_lens, torch.float32)
    assert_close(paged_attention_decode_ref(*case, 0.3).cpu().double(), naive_decode(*case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("context_lens", CONTEXTS)
def test_paged_decode_matches_reference(context_lens, heads, block_size, dtype):
    case = make_decode_case(*heads, block_size, context_lens, dtype)
    out = paged_attention_decode(*case, 0.3)
    assert out.dtype == dtype and out.shape == case[0].shape
    assert_close(out, paged_attention_decode_ref(*case, 0.3), **TOLERANCES[dtype])


def test_decode_splits_fill_the_device_only_when_the_batch_cannot():
    assert paged.decode_splits(256, 32, 4096, 132) == 1                 # 8,192 programs already
    assert paged.decode_splits(1, 32, 4096, 132) == 16                  # 4 programs an SM, context permitting
    assert paged.decode_splits(1, 8, 512, 132) == 2                     # >= MIN_SPLIT_TOKENS positions each
    assert paged.decode_splits(4, 2, 100, 132) == 1                     # too short to split
    assert paged.decode_splits(8, 8, 1 << 20, 132) == 9


def test_sm_count_reads_the_device_properties_on_cuda(monkeypatch):
    paged.sm_count.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=78))
    try:
        assert paged.sm_count(torch.device("cuda", 0)) == 78 and paged.sm_count(torch.device("cpu")) == 132
    finally:
        paged.sm_count.cache_clear()


# splits None: the wrapper's own choice (4 for one sequence of 1,000 on 2 kv heads)
SPLIT_CASES = [([700, 1, 0, 300], 2), ([700, 1, 0, 300], 8), ([700, 1, 0, 300], None), ([1000], None)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("context_lens, splits", SPLIT_CASES)
def test_split_decode_matches_reference_and_repeats_bit_for_bit(context_lens, heads, splits, dtype, monkeypatch):
    if splits is not None:
        monkeypatch.setattr(paged, "decode_splits", lambda *args: splits)
    case = make_decode_case(*heads, 16, context_lens, dtype)
    out = paged_attention_decode(*case, 0.3)
    assert_close(out, paged_attention_decode_ref(*case, 0.3), **TOLERANCES[dtype])
    assert torch.equal(out, paged_attention_decode(*case, 0.3))        # a fixed-order reduce: no atomics


def make_prefill_case(n_heads, n_kv_heads, head_dim, seq_lens, dtype, seed=0):
    """q/k/v as views split from one packed qkv projection, as the model produces them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(sum(seq_lens), n_heads + 2 * n_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads, n_kv_heads, n_kv_heads], dim=1)
    cu_seqlens = torch.tensor([0] + seq_lens, device=DEVICE).cumsum(0).to(torch.int32)
    return q, k, v, cu_seqlens, max(seq_lens)


SEQ_LENS = [[1], [5, 64, 65, 1], [130, 7]]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("seq_lens", SEQ_LENS)
def test_prefill_reference_matches_naive(seq_lens, heads):
    q, k, v, cu_seqlens, max_seqlen = make_prefill_case(*heads, seq_lens, torch.float32)
    out = prefill_attention_ref(q, k, v, cu_seqlens, max_seqlen, 0.3).cpu().double()
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert_close(out[lo:hi], naive_attention(q[lo:hi], k[lo:hi], v[lo:hi], causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("seq_lens", SEQ_LENS)
def test_prefill_matches_reference(seq_lens, heads, dtype):
    case = make_prefill_case(*heads, seq_lens, dtype)
    out = prefill_attention(*case, 0.3)
    assert out.dtype == dtype and out.shape == case[0].shape
    assert_close(out, prefill_attention_ref(*case, 0.3), **TOLERANCES[dtype])


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
def test_paged_decode_replays_in_a_cuda_graph_with_new_context_lens():
    q, k_cache, v_cache, block_tables, context_lens = make_decode_case(8, 2, 64, 16, [40, 3, 90, 0], torch.float16)
    out = torch.empty_like(q)
    run = lambda: out.copy_(paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, 0.3))  # noqa
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    context_lens.copy_(torch.tensor([41, 16, 96, 0], dtype=torch.int32))   # within the pages held
    graph.replay()
    torch.cuda.synchronize()
    expected = paged_attention_decode_ref(q, k_cache, v_cache, block_tables, context_lens, 0.3)
    assert_close(out, expected, **TOLERANCES[torch.float16])
