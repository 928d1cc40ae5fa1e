"""LoRA expand for a mixed-adapter batch: y[t, slice s] += scale[s, a] * (xa[s, t, :r] @ B_s[a])  (a = slot(t)).

Row k of B for (slice s, slot a) starts at element offset b_rows[s, a, k] of the flat pool and is
d_out(s) long; slice s writes columns slice_offsets[s]:slice_offsets[s + 1] of y (q/k/v or gate/up in
one call).
"""
import torch
import triton
import triton.language as tl


def lora_expand_ref(y: torch.Tensor, xa: torch.Tensor, pool: torch.Tensor, b_rows: torch.Tensor,
                    ranks: torch.Tensor, scales: torch.Tensor, seg_starts: torch.Tensor,
                    seg_slots: torch.Tensor, max_seg_len: int, slice_offsets: tuple[int, ...]) -> None:
    """Pure-torch reference; adds into y in place.

    y [T, slice_offsets[-1]]; xa float32 [n_slices, T, R] from lora_shrink; b_rows int64 [n_slices, S, R];
    ranks int32 [n_slices, S]; scales float32 [n_slices, S]; segments as in lora_shrink.
    for each segment g with slot a >= 0, slice s:
        y[tokens(g), off[s]:off[s+1]] += (xa[s, tokens(g), :r] @ B[s, a, :r]) * scales[s, a]
    """
    starts, slots = seg_starts.tolist(), seg_slots.tolist()
    for g, slot in enumerate(slots):
        if slot < 0:
            continue
        tokens = slice(starts[g], starts[g + 1])
        for s in range(len(slice_offsets) - 1):
            r = int(ranks[s, slot])
            if r == 0:
                continue
            lo, hi = slice_offsets[s], slice_offsets[s + 1]
            cols = torch.arange(hi - lo, device=y.device)
            b = pool[b_rows[s, slot, :r, None] + cols]            # [r, d_out]
            delta = (xa[s, tokens, :r].to(y.dtype) @ b) * scales[s, slot].to(y.dtype)
            y[tokens, lo:hi] += delta


@triton.jit
def _expand_kernel(y_ptr, xa_ptr, pool_ptr, b_rows_ptr, ranks_ptr, scales_ptr, seg_starts_ptr, seg_slots_ptr,
                   n_tokens, n_slots, max_rank, stride_y, n_col_blocks, off0, off1, off2, off3,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    # grid: (segment, token block of the segment, slice * column block); BLOCK_M == 1 is the gather form
    seg = tl.program_id(0)
    s = tl.program_id(2) // n_col_blocks
    col_block = tl.program_id(2) % n_col_blocks
    slot = tl.load(seg_slots_ptr + seg)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + s * n_slots + slot)
    if rank == 0:
        return
    # slice s owns columns lo:hi of y (scalars, not a tensor, so nothing is copied to the device per call)
    lo = tl.where(s == 0, off0, tl.where(s == 1, off1, off2))
    hi = tl.where(s == 0, off1, tl.where(s == 1, off2, off3))
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    if col_block * BLOCK_N >= hi - lo:
        return
    col_mask = cols < hi - lo
    start = tl.load(seg_starts_ptr + seg) + tl.program_id(1) * BLOCK_M
    end = tl.load(seg_starts_ptr + seg + 1)
    if start >= end:
        return
    tokens = start + tl.arange(0, BLOCK_M)
    token_mask = tokens < end
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, rank, BLOCK_R):                        # rank not padded: the loop stops at it
        ks = k0 + tl.arange(0, BLOCK_R)
        k_mask = ks < rank
        xa = tl.load(xa_ptr + (s * n_tokens + tokens[:, None]) * max_rank + ks[None, :],
                     mask=token_mask[:, None] & k_mask[None, :], other=0.0)        # [M, R] fp32
        row_starts = tl.load(b_rows_ptr + (s * n_slots + slot) * max_rank + ks, mask=k_mask, other=0)
        b = tl.load(pool_ptr + row_starts[:, None] + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)            # [R, N]
        if BLOCK_M == 1:
            acc += tl.sum(tl.trans(xa) * b.to(tl.float32), axis=0)[None, :]
        else:
            acc = tl.dot(xa.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    scale = tl.load(scales_ptr + s * n_slots + slot)
    y_ptrs = y_ptr + tokens[:, None].to(tl.int64) * stride_y + lo + cols[None, :]   # int64: may pass 2**31
    mask = token_mask[:, None] & col_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y.dtype), mask=mask)


@torch.inference_mode()
def lora_expand(y: torch.Tensor, xa: torch.Tensor, pool: torch.Tensor, b_rows: torch.Tensor,
                ranks: torch.Tensor, scales: torch.Tensor, seg_starts: torch.Tensor,
                seg_slots: torch.Tensor, max_seg_len: int, slice_offsets: tuple[int, ...]) -> None:
    """Triton version of lora_expand_ref (same arguments); adds into y in place, accumulating in fp32.

    max_seg_len == 1 runs the gather form (one program row per token, no host sync: CUDA-graph safe);
    longer segments run the segment form (token blocks x tl.dot). Up to 3 slices (q/k/v) per call.
    """
    n_slices, n_slots, max_rank = b_rows.shape
    n_tokens = y.shape[0]
    assert y.dtype in (torch.float16, torch.bfloat16, torch.float32) and y.stride(1) == 1
    assert xa.dtype == torch.float32 and xa.shape == (n_slices, n_tokens, max_rank) and xa.is_contiguous()
    assert pool.dim() == 1 and pool.dtype == y.dtype and pool.is_contiguous()
    assert b_rows.dtype == torch.int64 and b_rows.is_contiguous()
    assert ranks.dtype == torch.int32 and ranks.shape == (n_slices, n_slots) and ranks.is_contiguous()
    assert scales.dtype == torch.float32 and scales.shape == (n_slices, n_slots) and scales.is_contiguous()
    assert seg_starts.dtype == torch.int32 and seg_slots.dtype == torch.int32
    assert seg_starts.shape == (seg_slots.shape[0] + 1,) and max_seg_len >= 1
    assert max_seg_len > 1 or seg_slots.shape[0] == n_tokens, "gather form: one token per segment"
    assert 1 <= n_slices <= 3 and len(slice_offsets) == n_slices + 1 and slice_offsets[-1] == y.shape[1]
    if n_tokens == 0 or seg_slots.shape[0] == 0:
        return
    offsets = list(slice_offsets) + [slice_offsets[-1]] * (4 - len(slice_offsets))
    max_d_out = max(hi - lo for lo, hi in zip(slice_offsets[:-1], slice_offsets[1:]))
    block_m = 1 if max_seg_len == 1 else (16 if max_seg_len <= 16 else 64)
    block_n = 256 if block_m == 1 else 64
    block_r = 16
    n_col_blocks = triton.cdiv(max_d_out, block_n)
    grid = (seg_slots.shape[0], triton.cdiv(max_seg_len, block_m), n_slices * n_col_blocks)
    _expand_kernel[grid](y, xa, pool, b_rows, ranks, scales, seg_starts, seg_slots,
                         n_tokens, n_slots, max_rank, y.stride(0), n_col_blocks, *offsets,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
                         DOT_PRECISION="ieee" if y.dtype == torch.float32 else "tf32")
