"""Causal prefill attention over the paged KV cache: the new tokens of each sequence attend to every
earlier token of it, cached pages (a shared prompt prefix) and new tokens alike."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.attention_tiles import (check_paged_cache, online_softmax_step, paged_kv_tile, query_tile,
                                    store_output_tile)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens: torch.Tensor, context_lens: torch.Tensor,
                                max_seqlen: int, scale: float) -> torch.Tensor:
    """Pure-torch reference.

    q [T, Hq, D]: the new tokens of B sequences packed back to back, sequence b's being q[cu[b]:cu[b+1]]
    (cu_seqlens int32 [B + 1]); k_cache, v_cache [num_pages, block_size, Hkv, D] hold the K/V of all
    context_lens[b] tokens of sequence b (int32 [B]; the new ones already written), at the pages of
    block_tables[b] (int32 [B, max_blocks]). The new tokens are a sequence's last ones: query i of b sits at
    position p = context_lens[b] - n_b + i and attends to positions 0..p (GQA: query head h reads kv head
    h // (Hq // Hkv)). max_seqlen is the largest n_b. Returns [T, Hq, D] in q's dtype.
    """
    n_heads, n_kv_heads, block_size = q.shape[1], k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        n_ctx = int(context_lens[b])
        pages = block_tables[b, : (n_ctx + block_size - 1) // block_size].long()
        k = k_cache[pages].flatten(0, 1)[:n_ctx]                    # [n_ctx, Hkv, D]
        v = v_cache[pages].flatten(0, 1)[:n_ctx]
        query_pos = torch.arange(n_ctx - (hi - lo), n_ctx, device=q.device)
        visible = torch.arange(n_ctx, device=q.device)[None, :] <= query_pos[:, None]
        out[lo:hi] = F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=visible, scale=scale,
            enable_gqa=n_heads != n_kv_heads).transpose(0, 1)
    return out


@triton.jit
def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr, out_ptr, scale,
                          block_size, max_blocks, head_dim, group,
                          stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                          stride_ot, stride_oh,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    # grid: (sequence, block of new tokens, query head); flash-attention forward, keys read page by page
    seq = tl.program_id(0)
    head = tl.program_id(2)
    kv_head = head // group
    q_start = tl.load(cu_seqlens_ptr + seq)
    n_new = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    q_lo = tl.program_id(1) * BLOCK_M
    if q_lo >= n_new:
        return
    n_ctx = tl.load(context_lens_ptr + seq)
    q_idx = q_lo + tl.arange(0, BLOCK_M)
    q_mask = q_idx < n_new
    q_pos = n_ctx - n_new + q_idx                                                  # positions in the sequence
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    q_rows = (q_start + q_idx).to(tl.int64)[:, None]
    q = query_tile(q_ptr, q_rows, q_mask, head, stride_qt, stride_qh, dims, dim_mask)  # [M, D]
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634                                          # exp -> exp2
    kv_end = tl.minimum(n_ctx - n_new + q_lo + BLOCK_M, n_ctx)                    # causal: no later keys
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < n_ctx
        k, v = paged_kv_tile(k_ptr, v_ptr, block_tables_ptr + seq * max_blocks, pos, pos_mask, block_size, kv_head,
                             dims, dim_mask, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh)
        m_i, l_i, acc = online_softmax_step(q, k, v, pos[None, :] <= q_pos[:, None], m_i, l_i, acc, qk_scale,
                                            DOT_PRECISION)
    # position 0 is always visible: l_i > 0
    store_output_tile(out_ptr, q_rows, q_mask, head, stride_ot, stride_oh, dims, dim_mask, acc, l_i)


@torch.inference_mode()
def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens: torch.Tensor, context_lens: torch.Tensor,
                            max_seqlen: int, scale: float) -> torch.Tensor:
    """Triton version of paged_prefill_attention_ref (same arguments and result).

    One program per (sequence, block of new tokens, query head); keys past the block's last query are
    never read. q may be a strided view (split from one qkv projection); the last dim is dense.
    """
    n_tokens, n_heads, head_dim = q.shape
    _, block_size, n_kv_heads, _ = k_cache.shape
    batch = cu_seqlens.shape[0] - 1
    check_paged_cache(q, k_cache, v_cache, block_tables, context_lens, batch)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.is_contiguous()
    out = torch.empty_like(q)
    if n_tokens == 0:
        return out
    block = 32 if q.dtype == torch.float32 else 64        # fp32 tiles twice the bytes: keep shared memory < 100 KB
    grid = (batch, triton.cdiv(max_seqlen, block), n_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, out, scale,
        block_size, block_tables.shape[1], head_dim, n_heads // n_kv_heads,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return out
