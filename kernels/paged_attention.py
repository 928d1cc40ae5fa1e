"""Decode attention over the paged KV cache: one new query token per sequence."""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.attention_tiles import check_paged_cache, online_softmax_step, paged_kv_tile


def paged_attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Pure-torch reference.

    q [B, Hq, D]; k_cache, v_cache [num_pages, block_size, Hkv, D] (may be strided views of the pool);
    block_tables int32 [B, max_blocks] (page ids; entries past a row's blocks are never read); context_lens int32 [B].
    out[b] = softmax(q[b] K_b^T * scale) V_b over the first context_lens[b] cached tokens (GQA: query
    head h reads kv head h // (Hq // Hkv)). Returns [B, Hq, D] in q's dtype; zeros where
    context_lens[b] == 0.
    """
    batch, n_heads, _ = q.shape
    block_size, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pages = block_tables[b, : (n + block_size - 1) // block_size].long()
        k = k_cache[pages].flatten(0, 1)[:n]                        # [n, Hkv, D]
        v = v_cache[pages].flatten(0, 1)[:n]
        out[b] = F.scaled_dot_product_attention(
            q[b].unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=scale,
            enable_gqa=n_heads != n_kv_heads).squeeze(1)
    return out


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, out_ptr, partial_ptr, stats_ptr,
                         scale, block_size, max_blocks, head_dim, group, split_tokens,
                         stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                         stride_ob, stride_oh,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    # grid: (sequence, kv head, context split); the query heads of one GQA group share each K/V tile they read.
    # SPLIT: write this split's unnormalized output and its (max, sum) to the partial buffers for the reduce.
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    heads = kv_head * group + tl.arange(0, BLOCK_G)
    head_mask = tl.arange(0, BLOCK_G) < group
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)             # [G, D]
    start = split * split_tokens
    end = tl.minimum(tl.load(context_lens_ptr + b), start + split_tokens)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634                                          # exp -> exp2
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        k, v = paged_kv_tile(k_ptr, v_ptr, block_tables_ptr + b * max_blocks, pos, pos_mask, block_size, kv_head,
                             dims, dim_mask, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh)
        m_i, l_i, acc = online_softmax_step(q, k, v, pos_mask[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)
    if SPLIT:
        n_splits = tl.num_programs(2)
        rows = (b * tl.num_programs(1) * group + heads) * n_splits + split         # partial [B, Hq, S, ...]
        tl.store(partial_ptr + rows[:, None].to(tl.int64) * BLOCK_D + dims[None, :], acc,
                 mask=head_mask[:, None])
        tl.store(stats_ptr + rows * 2, m_i, mask=head_mask)
        tl.store(stats_ptr + rows * 2 + 1, l_i, mask=head_mask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]                          # empty context -> 0
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])


@triton.jit
def _reduce_splits_kernel(partial_ptr, stats_ptr, out_ptr, n_heads, n_splits, head_dim, stride_ob, stride_oh,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid: (sequence, query head); merges the splits in a fixed order (no atomics: deterministic)
    b = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    rows = (b * n_heads + h) * n_splits + splits
    m = tl.load(stats_ptr + rows * 2, mask=splits < n_splits, other=float("-inf"))
    l = tl.load(stats_ptr + rows * 2 + 1, mask=splits < n_splits, other=0.0)
    m_max = tl.maximum(tl.max(m, axis=0), -1e30)          # finite even when every split is empty
    weight = tl.exp2(m - m_max)                                                    # empty splits weigh 0
    acc = tl.load(partial_ptr + rows[:, None].to(tl.int64) * BLOCK_D + dims[None, :],
                  mask=(splits < n_splits)[:, None], other=0.0)
    total = tl.sum(l * weight, axis=0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # empty context -> 0
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


BLOCK_N = 64
MIN_SPLIT_TOKENS = 256    # a split reads at least this many positions (4 tiles), or it is not worth a program
PROGRAMS_PER_SM = 4


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (a host-side property: no sync); off CUDA, an H200's 132."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def decode_splits(batch: int, n_kv_heads: int, max_context: int, sms: int) -> int:
    """Programs that share one (sequence, kv head)'s context: enough for PROGRAMS_PER_SM programs per SM when
    the batch alone is too small, never less than MIN_SPLIT_TOKENS positions each. Decided from shapes and
    the block table's width (a static bound in a CUDA graph), never from context_lens: no host sync."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, max(batch * n_kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_TOKENS)))


@torch.inference_mode()
def paged_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Triton version of paged_attention_decode_ref (same arguments and result).

    Flash-style online softmax over the sequence's pages, one program per (sequence, kv head, context
    split); with several splits (flash-decoding, for batches too small to fill the device) a second kernel
    merges their partial results in a fixed order. No host sync, so it can be captured in a CUDA graph
    (rows with context_lens 0 come out zero).
    """
    batch, n_heads, head_dim = q.shape
    _, block_size, n_kv_heads, _ = k_cache.shape
    check_paged_cache(q, k_cache, v_cache, block_tables, context_lens, batch)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group, block_d = n_heads // n_kv_heads, max(16, triton.next_power_of_2(head_dim))   # tl.dot: dims >= 16
    max_context = max(block_tables.shape[1] * block_size, 1)
    splits = decode_splits(batch, n_kv_heads, max_context, sm_count(q.device))
    split_tokens = triton.cdiv(triton.cdiv(max_context, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(max_context, split_tokens)                      # no split left without positions
    partial = torch.empty(batch, n_heads, splits, block_d, dtype=torch.float32, device=q.device) \
        if splits > 1 else out
    stats = torch.empty(batch, n_heads, splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    _paged_decode_kernel[(batch, n_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, partial, stats, scale,
        block_size, block_tables.shape[1], head_dim, group, split_tokens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SPLIT=splits > 1)
    if splits > 1:
        _reduce_splits_kernel[(batch, n_heads)](partial, stats, out, n_heads, splits, head_dim, out.stride(0),
                                                out.stride(1), BLOCK_S=triton.next_power_of_2(splits),
                                                BLOCK_D=block_d)
    return out
