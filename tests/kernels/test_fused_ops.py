"""The fused small ops of a layer: references against naive float64 math, Triton kernels against the references
(RMSNorm with the residual add, RoPE with the K/V cache write, SiLU-and-mul) over odd hidden sizes, GQA head
layouts, head dims 64/128 and the rope scaling types."""
import pytest
import torch
from torch.testing import assert_close

from engine.model import ModelArgs, rope_inv_freq
from kernel_cases import DEVICE, DTYPES, TOLERANCES
from kernels import (rms_norm, rms_norm_ref, rope_and_store_kv, rope_and_store_kv_ref, silu_and_mul,
                     silu_and_mul_ref)

HIDDEN = [64, 2049, 4096]
TOKENS = [1, 7, 33]


def randn(*shape, dtype, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE, dtype)


def naive_rms_norm(x, weight, eps):
    x = x.double().cpu()
    return weight.double().cpu() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_reference_matches_naive(with_residual):
    x, residual, weight = (randn(5, 2049, dtype=torch.float32, seed=s) for s in range(3))
    expected_sum = (x + residual).double().cpu() if with_residual else x.double().cpu()
    out, new_residual = rms_norm_ref(x, residual.clone() if with_residual else None, weight[0], 1e-5)
    assert_close(new_residual.double().cpu(), expected_sum)
    assert_close(out.double().cpu(), naive_rms_norm(expected_sum, weight[0], 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(with_residual, tokens, hidden, dtype):
    x = randn(tokens, hidden, dtype=dtype, seed=1, scale=3.0)
    residual = randn(tokens, hidden, dtype=dtype, seed=2) if with_residual else None
    weight = randn(hidden, dtype=dtype, seed=3)
    expected, expected_residual = rms_norm_ref(x.clone(), None if residual is None else residual.clone(), weight,
                                               1e-6)
    out, new_residual = rms_norm(x, residual, weight, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected, **TOLERANCES[dtype])
    assert_close(new_residual, expected_residual, atol=0, rtol=0)       # the sum is rounded the same way
    assert (new_residual is residual) if with_residual else (new_residual is x)


def cos_sin(positions: torch.Tensor, head_dim: int, rope_scaling: dict | None, dtype) -> tuple:
    args = ModelArgs("llama", 10, 64, 64, 1, 1, 1, head_dim, 1e-6, 500000.0, rope_scaling, 4096, False, False,
                     False, False, None)
    freqs = positions[:, None].float() * rope_inv_freq(args)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


ROPE_SCALING = {"default": None, "linear": {"rope_type": "linear", "factor": 4.0},
                "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 1024}}
# (query heads, kv heads, head dim)
ROPE_HEADS = [(4, 4, 64), (8, 2, 128), (6, 1, 64), (4, 2, 16)]


def rope_case(tokens, n_heads, n_kv_heads, head_dim, block_size, scaling, dtype, slot_dtype=torch.int64, seed=0):
    """q/k/v as views of one qkv projection; caches as strided views of an engine-like pool
    [pages, layers, 2, block, Hkv, D]; tokens at random distinct slots of random pages."""
    gen = torch.Generator().manual_seed(seed)
    qkv = randn(tokens, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype, seed=seed)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split([n_heads * head_dim, n_kv_heads * head_dim,
                                                                 n_kv_heads * head_dim], dim=1))
    n_pages = -(-tokens // block_size) + 3
    pool = torch.zeros(n_pages, 2, 2, block_size, n_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slots = torch.randperm(n_pages * block_size, generator=gen)[:tokens].to(DEVICE, slot_dtype)
    positions = torch.randint(0, 4000, (tokens,), generator=gen)
    cos, sin = cos_sin(positions, head_dim, ROPE_SCALING[scaling], dtype)
    return q, k, v, cos, sin, pool[:, 1, 0], pool[:, 1, 1], slots, pool


def test_rope_reference_rotates_pairs_and_fills_the_slots():
    q, k, v, cos, sin, k_cache, v_cache, slots, _ = rope_case(5, 4, 2, 16, 4, "llama3", torch.float32)
    q0, k0, v0 = q.double().cpu(), k.double().cpu(), v.clone()
    rope_and_store_kv_ref(q, k, v, cos, sin, k_cache, v_cache, slots)
    half = 8
    angle = torch.complex(cos[:, None, :half].double().cpu(), sin[:, None, :half].double().cpu())
    for before, after in ((q0, q), (k0, k)):          # (x1 + i x2) * e^(i theta), as rotate_half defines it
        rotated = torch.complex(before[..., :half], before[..., half:]) * angle
        assert_close(after.double().cpu(), torch.cat((rotated.real, rotated.imag), -1), atol=1e-5, rtol=1e-5)
    block = k_cache.shape[1]
    for t, slot in enumerate(slots.tolist()):
        assert torch.equal(k_cache[slot // block, slot % block], k[t])
        assert torch.equal(v_cache[slot // block, slot % block], v0[t])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", ROPE_HEADS)
@pytest.mark.parametrize("scaling", list(ROPE_SCALING))
@pytest.mark.parametrize("tokens, block_size, slot_dtype", [(1, 16, torch.int64), (19, 8, torch.int32)])
def test_rope_and_kv_write_match_reference(tokens, block_size, slot_dtype, scaling, heads, dtype):
    case = rope_case(tokens, *heads, block_size, scaling, dtype, slot_dtype)
    expected = rope_case(tokens, *heads, block_size, scaling, dtype, slot_dtype)
    rope_and_store_kv(*case[:8])
    rope_and_store_kv_ref(*expected[:8])
    q, k, v, pool = case[0], case[1], case[2], case[8]
    for got, want in ((q, expected[0]), (k, expected[1]), (pool, expected[8])):
        assert_close(got, want, **TOLERANCES[dtype])
    assert torch.equal(v, expected[2])                                 # v is only copied
    assert pool[:, 0].abs().sum() == 0                                   # other layers untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [11, 128, 2049, 11008])
@pytest.mark.parametrize("tokens", [1, 5])
def test_silu_and_mul_matches_reference_and_naive(tokens, width, dtype):
    gate_up = randn(tokens, 2 * width, dtype=dtype, seed=4, scale=2.0)
    expected = silu_and_mul_ref(gate_up)
    gate, up = gate_up.double().cpu().chunk(2, dim=-1)
    assert_close(expected.double().cpu(), gate * torch.sigmoid(gate) * up, **TOLERANCES[dtype])
    out = silu_and_mul(gate_up)
    assert out.dtype == dtype and out.shape == (tokens, width)
    assert_close(out, expected, **TOLERANCES[dtype])
