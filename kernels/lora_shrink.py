"""LoRA shrink for a mixed-adapter batch: xa[s, t, :r] = x[t] @ A_s[slot(t)]  (r = that adapter's rank).

Adapter weights live in the unified page pool as rows (S-LoRA): row k of A^T for (slice s, slot a)
starts at element offset a_rows[s, a, k] of the flat pool and is d_in long. Rows past an adapter's
rank are never read, so ranks are not padded in compute.
"""
import torch
import triton
import triton.language as tl


def lora_shrink_ref(x: torch.Tensor, pool: torch.Tensor, a_rows: torch.Tensor, ranks: torch.Tensor,
                    seg_starts: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """Pure-torch reference.

    x [T, d_in]; pool 1-D, x's dtype; a_rows int64 [n_slices, S, R]; ranks int32 [n_slices, S];
    seg_starts int32 [n_seg + 1] (token boundaries of runs of one slot); seg_slots int32 [n_seg], -1 = none;
    max_seg_len: the longest segment (1 = decode, one token a segment).
    Returns xa float32 [n_slices, T, R]; columns past a slot's rank are zero.
    for each segment g with slot a >= 0, slice s:  xa[s, tokens(g), :r] = x[tokens(g)] @ A[s, a, :r].T
    """
    n_slices, _, max_rank = a_rows.shape
    d_in = x.shape[1]
    xa = torch.zeros(n_slices, x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    cols = torch.arange(d_in, device=x.device)
    starts, slots = seg_starts.tolist(), seg_slots.tolist()
    for g, slot in enumerate(slots):
        if slot < 0:
            continue
        tokens = slice(starts[g], starts[g + 1])
        for s in range(n_slices):
            r = int(ranks[s, slot])
            if r == 0:
                continue
            a_t = pool[a_rows[s, slot, :r, None] + cols]          # [r, d_in]
            xa[s, tokens, :r] = (x[tokens] @ a_t.T).float()
    return xa


@triton.jit
def _shrink_kernel(x_ptr, pool_ptr, a_rows_ptr, ranks_ptr, seg_starts_ptr, seg_slots_ptr, xa_ptr,
                   n_tokens, d_in, n_slots, max_rank, stride_x,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    # grid: (segment, token block of the segment, slice * rank block); BLOCK_M == 1 is the gather form
    seg = tl.program_id(0)
    n_rank_blocks = tl.cdiv(max_rank, BLOCK_R)
    s = tl.program_id(2) // n_rank_blocks
    rank_block = tl.program_id(2) % n_rank_blocks
    slot = tl.load(seg_slots_ptr + seg)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + s * n_slots + slot)
    if rank_block * BLOCK_R >= rank:                      # rank not padded: blocks past it do nothing
        return
    start = tl.load(seg_starts_ptr + seg) + tl.program_id(1) * BLOCK_M
    end = tl.load(seg_starts_ptr + seg + 1)
    if start >= end:
        return
    tokens = start + tl.arange(0, BLOCK_M)
    token_mask = tokens < end
    rows = rank_block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < rank
    row_starts = tl.load(a_rows_ptr + (s * n_slots + slot) * max_rank + rows, mask=row_mask, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < d_in
        x = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_x + ks[None, :],   # int64: may pass 2**31
                    mask=token_mask[:, None] & k_mask[None, :], other=0.0)          # [M, K]
        a = tl.load(pool_ptr + row_starts[:, None] + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)            # [R, K]
        if BLOCK_M == 1:
            acc += tl.sum(x.to(tl.float32) * a.to(tl.float32), axis=1)[None, :]
        else:
            acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)
    xa_ptrs = xa_ptr + (s * n_tokens + tokens[:, None]) * max_rank + rows[None, :]
    tl.store(xa_ptrs, acc, mask=token_mask[:, None] & row_mask[None, :])


@torch.inference_mode()
def lora_shrink(x: torch.Tensor, pool: torch.Tensor, a_rows: torch.Tensor, ranks: torch.Tensor,
                seg_starts: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """Triton version of lora_shrink_ref (same arguments and result).

    max_seg_len == 1 runs the gather form (BGMV: one program row per token, no host sync, so it can be
    captured in a CUDA graph); longer segments run the segment form (SGMV: token blocks x tl.dot).
    """
    n_slices, n_slots, max_rank = a_rows.shape
    n_tokens, d_in = x.shape
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.stride(1) == 1
    assert pool.dim() == 1 and pool.dtype == x.dtype and pool.is_contiguous()
    assert a_rows.dtype == torch.int64 and a_rows.is_contiguous()
    assert ranks.dtype == torch.int32 and ranks.shape == (n_slices, n_slots) and ranks.is_contiguous()
    assert seg_starts.dtype == torch.int32 and seg_slots.dtype == torch.int32
    assert seg_starts.shape == (seg_slots.shape[0] + 1,) and max_seg_len >= 1
    assert max_seg_len > 1 or seg_slots.shape[0] == n_tokens, "gather form: one token per segment"
    xa = torch.zeros(n_slices, n_tokens, max_rank, dtype=torch.float32, device=x.device)
    if n_tokens == 0 or seg_slots.shape[0] == 0:
        return xa
    block_r = 16
    block_m = 1 if max_seg_len == 1 else (16 if max_seg_len <= 16 else 64)
    block_k = 256 if block_m == 1 else 64
    grid = (seg_slots.shape[0], triton.cdiv(max_seg_len, block_m), n_slices * triton.cdiv(max_rank, block_r))
    _shrink_kernel[grid](x, pool, a_rows, ranks, seg_starts, seg_slots, xa,
                         n_tokens, d_in, n_slots, max_rank, x.stride(0),
                         BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
                         DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return xa
