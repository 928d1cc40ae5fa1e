"""What the attention kernels share, as Triton functions (inlined where called): a tile of K/V read from the
paged cache, and one step of flash attention's online softmax."""
import triton
import triton.language as tl


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
