"""RoPE on q and k together with the write of k and v into the paged KV cache, in one pass."""
import torch
import triton
import triton.language as tl

HEADS_PER_PROGRAM = 8


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_and_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Pure-torch reference.

    q [T, Hq, D], k and v [T, Hkv, D] (may be strided views of one qkv projection); cos, sin [T, D] in q's
    dtype, each half the same; k_cache, v_cache [num_pages, block_size, Hkv, D] (strided views of the pool);
    slot_mapping int32/int64 [T]: page * block_size + offset of each token. In place: q = q * cos + rotate_half(q)
    * sin, the same for k, then k and v are written to their slots.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]
    q.copy_(q * cos + rotate_half(q) * sin)
    k.copy_(k * cos + rotate_half(k) * sin)
    pages, offsets = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
    k_cache[pages, offsets] = k
    v_cache[pages, offsets] = v


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, n_q_heads, n_heads,
                    block_size, half, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_cos, stride_sin, stride_kcp, stride_kct, stride_kch, stride_vcp, stride_vct, stride_vch,
                    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # grid: (token, block of BLOCK_H heads out of the q heads then the kv heads); a kv head's row rotates k
    # and writes k and v to the cache
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    is_q = heads < n_q_heads
    is_kv = (heads >= n_q_heads) & (heads < n_heads)
    kv_heads = tl.where(is_kv, heads - n_q_heads, 0)
    mask = (is_q | is_kv)[:, None] & (dims < half)[None, :]
    kv_mask = is_kv[:, None] & (dims < half)[None, :]
    cos = tl.load(cos_ptr + t * stride_cos + dims, mask=dims < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_sin + dims, mask=dims < half, other=0.0).to(tl.float32)[None, :]
    x_ptr = tl.where(is_q, q_ptr + t * stride_qt + heads * stride_qh,
                     k_ptr + t * stride_kt + kv_heads * stride_kh)[:, None] + dims[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0)
    r1 = (x1.to(tl.float32) * cos - x2.to(tl.float32) * sin).to(x1.dtype)
    r2 = (x2.to(tl.float32) * cos + x1.to(tl.float32) * sin).to(x1.dtype)
    tl.store(x_ptr, r1, mask=mask)
    tl.store(x_ptr + half, r2, mask=mask)
    slot = tl.load(slot_ptr + t).to(tl.int64)                   # page * page stride passes 2**31
    page, offset = slot // block_size, slot % block_size
    k_dst = (k_cache_ptr + page * stride_kcp + offset * stride_kct + kv_heads * stride_kch)[:, None] + dims[None, :]
    tl.store(k_dst, r1, mask=kv_mask)
    tl.store(k_dst + half, r2, mask=kv_mask)
    v_src = (v_ptr + t * stride_vt + kv_heads * stride_vh)[:, None] + dims[None, :]
    v_dst = (v_cache_ptr + page * stride_vcp + offset * stride_vct + kv_heads * stride_vch)[:, None] + dims[None, :]
    tl.store(v_dst, tl.load(v_src, mask=kv_mask), mask=kv_mask)
    tl.store(v_dst + half, tl.load(v_src + half, mask=kv_mask), mask=kv_mask)


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
    assert slot_mapping.dtype in (torch.int32, torch.int64) and slot_mapping.is_contiguous()
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (n_kv_heads, head_dim)
    assert k_cache.stride(3) == v_cache.stride(3) == 1
    if tokens == 0:
        return
    half, n_heads = head_dim // 2, n_q_heads + n_kv_heads
    # 8 heads a program: a 7B's batch of 256 gets 2,048 programs, and a tile of 8 x 64 pairs per program
    block_h = min(HEADS_PER_PROGRAM, triton.next_power_of_2(n_heads))
    _rope_kv_kernel[(tokens, triton.cdiv(n_heads, block_h))](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping, n_q_heads, n_heads, k_cache.shape[1], half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4)
