"""Prefill attention over the paged cache (new tokens after a cached prefix): the reference against a naive
float64 softmax and against the varlen prefill kernel's reference, the Triton kernel against the reference,
over head layouts (MHA, GQA, MQA), page sizes, and prefixes of no tokens, part of a page and many pages."""
import pytest
import torch
from torch.testing import assert_close

from kernel_cases import DEVICE, DTYPES, TOLERANCES
from kernels import paged_prefill_attention, paged_prefill_attention_ref, prefill_attention_ref
from test_attention import HEADS, naive_attention

# (cached prefix tokens, new tokens) per sequence
CASES = [[(0, 5)], [(7, 1), (0, 33), (83, 12)], [(5, 70), (160, 3)]]


def make_case(n_heads, n_kv_heads, head_dim, block_size, lengths, dtype, seed=0):
    """Arguments of paged_prefill_attention: q split from a packed qkv projection, K/V caches as strided views of
    an engine-like pool [pages, layers, 2, block, Hkv, D], block tables over shuffled pages."""
    gen = torch.Generator().manual_seed(seed)
    context_lens = [cached + new for cached, new in lengths]
    max_blocks = max(-(-n // block_size) for n in context_lens) + 1
    n_pages = len(lengths) * max_blocks + 3
    pool = torch.randn(n_pages, 2, 2, block_size, n_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    pages = torch.randperm(n_pages, generator=gen).tolist()
    block_tables = torch.full((len(lengths), max_blocks), -1, dtype=torch.int32)
    for b, n in enumerate(context_lens):
        for i in range(-(-n // block_size)):
            block_tables[b, i] = pages.pop()
    new = [n for _, n in lengths]
    qkv = torch.randn(sum(new), n_heads + 2 * n_kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    cu_seqlens = torch.tensor([0] + new).cumsum(0).to(torch.int32)
    return (qkv[:, :n_heads], pool[:, 1, 0], pool[:, 1, 1], block_tables.to(DEVICE), cu_seqlens.to(DEVICE),
            torch.tensor(context_lens, dtype=torch.int32, device=DEVICE), max(new))


def cached_kv(k_cache, v_cache, block_tables, b, n):
    """K and V of the first n positions of sequence b, read slot by slot."""
    block_size = k_cache.shape[1]
    slots = [(int(block_tables[b, p // block_size]), p % block_size) for p in range(n)]
    return torch.stack([k_cache[page, i] for page, i in slots]), torch.stack([v_cache[page, i] for page, i in slots])


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("lengths", CASES)
def test_reference_matches_naive(lengths, heads, block_size):
    q, k_cache, v_cache, tables, cu, context_lens, max_new = make_case(*heads, block_size, lengths, torch.float32)
    out = paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu, context_lens, max_new, 0.3).cpu().double()
    bounds = cu.tolist()
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        k, v = cached_kv(k_cache, v_cache, tables, b, int(context_lens[b]))
        assert_close(out[lo:hi], naive_attention(q[lo:hi], k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_without_a_prefix_it_is_varlen_prefill_attention():
    lengths = [(0, 5), (0, 40), (0, 1)]
    q, k_cache, v_cache, tables, cu, context_lens, max_new = make_case(8, 2, 64, 16, lengths, torch.float32)
    k = torch.cat([cached_kv(k_cache, v_cache, tables, b, n)[0] for b, (_, n) in enumerate(lengths)])
    v = torch.cat([cached_kv(k_cache, v_cache, tables, b, n)[1] for b, (_, n) in enumerate(lengths)])
    assert_close(paged_prefill_attention_ref(q, k_cache, v_cache, tables, cu, context_lens, max_new, 0.3),
                 prefill_attention_ref(q, k, v, cu, max_new, 0.3), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("lengths", CASES)
def test_triton_matches_reference(lengths, heads, block_size, dtype):
    case = make_case(*heads, block_size, lengths, dtype)
    out = paged_prefill_attention(*case, 0.3)
    assert out.dtype == dtype and out.shape == case[0].shape
    assert_close(out, paged_prefill_attention_ref(*case, 0.3), **TOLERANCES[dtype])
