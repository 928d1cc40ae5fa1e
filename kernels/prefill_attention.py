"""Causal attention over the prompts of a prefill batch (varlen: sequences packed back to back)."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.attention_tiles import online_softmax_step, query_tile, store_output_tile


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          max_seqlen: int, scale: float) -> torch.Tensor:
    """Pure-torch reference.

    q [T, Hq, D]; k, v [T, Hkv, D]; cu_seqlens int32 [B + 1]: sequence b is tokens cu[b]:cu[b+1].
    Causal softmax attention within each sequence (GQA as in decode). Returns [T, Hq, D].
    """
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out[lo:hi] = F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1), k[lo:hi].transpose(0, 1), v[lo:hi].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=n_heads != n_kv_heads).transpose(0, 1)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, cu_seqlens_ptr, out_ptr, scale, head_dim, group,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    # grid: (sequence, query block, query head); flash-attention forward with a causal mask
    seq = tl.program_id(0)
    head = tl.program_id(2)
    kv_head = head // group
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    q_lo = tl.program_id(1) * BLOCK_M
    if q_lo >= seq_len:
        return
    q_pos = q_lo + tl.arange(0, BLOCK_M)
    q_mask = q_pos < seq_len
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    q_rows = (seq_start + q_pos).to(tl.int64)[:, None]
    q = query_tile(q_ptr, q_rows, q_mask, head, stride_qt, stride_qh, dims, dim_mask)  # [M, D]
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634                                          # exp -> exp2
    kv_end = tl.minimum(q_lo + BLOCK_M, seq_len)                                   # causal: no later keys
    for n0 in range(0, kv_end, BLOCK_N):
        kv_pos = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (kv_pos < seq_len)[:, None] & dim_mask[None, :]
        kv_rows = (seq_start + kv_pos).to(tl.int64)[:, None]
        k = tl.load(k_ptr + kv_rows * stride_kt + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_rows * stride_vt + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, kv_pos[None, :] <= q_pos[:, None], m_i, l_i, acc, qk_scale,
                                            DOT_PRECISION)
    store_output_tile(out_ptr, q_rows, q_mask, head, stride_ot, stride_oh, dims, dim_mask, acc, l_i)


@torch.inference_mode()
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int, scale: float) -> torch.Tensor:
    """Triton version of prefill_attention_ref (same arguments and result).

    One program per (sequence, block of queries, query head); keys past the block's last query are
    never read. q/k/v may be strided views (e.g. split from one qkv projection); the last dim is dense.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == v.dtype == q.dtype
    assert k.shape == v.shape == (n_tokens, n_kv_heads, head_dim) and n_heads % n_kv_heads == 0
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.is_contiguous()
    out = torch.empty_like(q)
    if n_tokens == 0:
        return out
    block = 32 if q.dtype == torch.float32 else 64        # fp32 tiles twice the bytes: keep shared memory < 100 KB
    grid = (cu_seqlens.shape[0] - 1, triton.cdiv(max_seqlen, block), n_heads)
    _prefill_kernel[grid](q, k, v, cu_seqlens, out, scale, head_dim, n_heads // n_kv_heads,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          out.stride(0), out.stride(1),
                          BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                          DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return out
