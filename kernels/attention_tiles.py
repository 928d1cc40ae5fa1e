"""What the attention kernels share: as Triton functions (inlined where called), a tile of queries read and
its output written, a tile of K/V read from the paged cache, and one step of flash attention's online softmax;
and the host-side checks of a paged cache's arguments."""
import torch
import triton
import triton.language as tl


def check_paged_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      context_lens: torch.Tensor, batch: int) -> None:
    """q [T, Hq, D] and a paged K/V cache [num_pages, block_size, Hkv, D] with `batch` sequences' block tables
    int32 [batch, max_blocks] and context lengths int32 [batch], as the paged kernels take them."""
    n_heads, head_dim = q.shape[1:]
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.stride(2) == 1
    assert k_cache.dtype == v_cache.dtype == q.dtype and k_cache.shape == v_cache.shape
    assert k_cache.shape[3] == head_dim and k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert n_heads % k_cache.shape[2] == 0
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == batch
    assert block_tables.is_contiguous() and context_lens.dtype == torch.int32 and context_lens.shape == (batch,)


@triton.jit
def query_tile(q_ptr, rows, row_mask, head, stride_qt, stride_qh, dims, dim_mask):
    """Queries [M, D] of one head at token rows `rows` (int64 [M, 1]: rows x stride may pass 2**31)."""
    return tl.load(q_ptr + rows * stride_qt + head * stride_qh + dims[None, :],
                   mask=row_mask[:, None] & dim_mask[None, :], other=0.0)


@triton.jit
def store_output_tile(out_ptr, rows, row_mask, head, stride_ot, stride_oh, dims, dim_mask, acc, l_i):
    """The attention output acc / l_i [M, D] of one head, at token rows `rows` as query_tile reads them."""
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit
def paged_kv_tile(k_ptr, v_ptr, table_ptr, pos, pos_mask, block_size, kv_head, dims, dim_mask,
                  stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh):
    """K and V [N, D] at positions `pos` of the sequence whose page ids start at table_ptr. A tile may span
    pages: each position's page is looked up, so block_size need not match N."""
    pages = tl.load(table_ptr + pos // block_size, mask=pos_mask, other=0)[:, None].to(tl.int64)
    in_page = (pos % block_size)[:, None]
    kv_mask = pos_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_ptr + pages * stride_kp + in_page * stride_kt + kv_head * stride_kh + dims[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + pages * stride_vp + in_page * stride_vt + kv_head * stride_vh + dims[None, :],
                mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one K/V tile [N, D] into the running max m_i [M], sum l_i [M] and output acc [M, D] of the queries
    q [M, D]; visible [M, N] (or broadcast to it) hides the keys a query may not see. qk_scale includes
    log2(e): the exponentials are exp2."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale      # [M, N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
