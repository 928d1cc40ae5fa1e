"""RoPE on q and k together with the write of k and v into the paged KV cache, in one pass."""
import torch
import triton
import triton.language as tl


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_and_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Pure-torch reference.

    q [T, Hq, D], k and v [T, Hkv, D] (may be strided views of one qkv projection); cos, sin [T, D] in q's
    dtype, each half the same; k_cache, v_cache [num_pages, block_size, Hkv, D] (strided views of the pool);
    slot_mapping int64 [T]: page * block_size + offset of each token. In place: q = q * cos + rotate_half(q)
    * sin, the same for k, then k and v are written to their slots.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    q.copy_(q * cos + rotate_half(q) * sin)
    k.copy_(k * cos + rotate_half(k) * sin)
    pages, offsets = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
    k_cache[pages, offsets] = k
    v_cache[pages, offsets] = v


@triton.jit
def _rotate(x_ptr, dims, half, mask, cos, sin):
    """The rotated halves of one head at x_ptr, stored back in place; returned for the cache write."""
    x1 = tl.load(x_ptr + dims, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + half + dims, mask=mask, other=0.0)
    r1 = (x1.to(tl.float32) * cos - x2.to(tl.float32) * sin).to(x1.dtype)
    r2 = (x2.to(tl.float32) * cos + x1.to(tl.float32) * sin).to(x1.dtype)
    tl.store(x_ptr + dims, r1, mask=mask)
    tl.store(x_ptr + half + dims, r2, mask=mask)
    return r1, r2


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, n_q_heads,
                    block_size, half, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_cos, stride_sin, stride_kcp, stride_kct, stride_kch, stride_vcp, stride_vct, stride_vch,
                    BLOCK_HALF: tl.constexpr):
    # grid: (token, q heads + kv heads); a kv head's program rotates k and writes k and v to the cache
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_HALF)
    mask = dims < half
    cos = tl.load(cos_ptr + t * stride_cos + dims, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + dims, mask=mask, other=0.0).to(tl.float32)
    if head < n_q_heads:
        _rotate(q_ptr + t * stride_qt + head * stride_qh, dims, half, mask, cos, sin)
    else:
        kv_head = head - n_q_heads
        k1, k2 = _rotate(k_ptr + t * stride_kt + kv_head * stride_kh, dims, half, mask, cos, sin)
        slot = tl.load(slot_ptr + t)
        page, offset = slot // block_size, slot % block_size
        k_dst = k_cache_ptr + page * stride_kcp + offset * stride_kct + kv_head * stride_kch
        tl.store(k_dst + dims, k1, mask=mask)
        tl.store(k_dst + half + dims, k2, mask=mask)
        v_src = v_ptr + t * stride_vt + kv_head * stride_vh
        v_dst = v_cache_ptr + page * stride_vcp + offset * stride_vct + kv_head * stride_vch
        tl.store(v_dst + dims, tl.load(v_src + dims, mask=mask), mask=mask)
        tl.store(v_dst + half + dims, tl.load(v_src + half + dims, mask=mask), mask=mask)


@torch.inference_mode()
def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Triton version of rope_and_store_kv_ref (same arguments and in-place effects)."""
    tokens, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and k.shape == v.shape == (tokens, n_kv_heads, head_dim)
    assert q.dtype == k.dtype == v.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype
    assert q.stride(2) == k.stride(2) == v.stride(2) == cos.stride(1) == sin.stride(1) == 1
    assert cos.shape == sin.shape == (tokens, head_dim) and slot_mapping.shape == (tokens,)
    assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (n_kv_heads, head_dim)
    assert k_cache.stride(3) == v_cache.stride(3) == 1
    if tokens == 0:
        return
    half = head_dim // 2
    _rope_kv_kernel[(tokens, n_q_heads + n_kv_heads)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping, n_q_heads, k_cache.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), BLOCK_HALF=triton.next_power_of_2(half), num_warps=1)
