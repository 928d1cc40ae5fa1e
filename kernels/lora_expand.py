"""LoRA expand for a mixed-adapter batch: y[t, slice s] += scale[s, a] * (sum_j xa[j, s, t, :r]) @ B_s[a]
(a = slot(t), r = its rank).

xa holds lora_shrink's split-K partials; they are added up here, in a fixed order (j = 0, 1, ...), so the
same batch gives bit-identical results run after run. Row k of B for (slice s, slot a) starts at element
offset b_rows[s, a, k] of the flat pool and is d_out(s) long; slice s writes columns
slice_offsets[s]:slice_offsets[s + 1] of y (q/k/v or gate/up in one call), adding into the base
projection's output in place. Tiles as in lora_shrink.
"""
import torch
import triton
import triton.language as tl

from kernels.lora_shrink import tile_runs

# Launch configurations by tile size, from bytes, not yet tuned on a GPU. (BLOCK_N: output columns a
# step of the program's loop writes, warps, stages). The whole rank is one MMA K (<= 64 rows of B).
EXPAND_CONFIGS = {
    16: (128, 4, 3),   # decode: a [64 x 128] bf16 tile of B (16 KB) per step keeps loads wide
    64: (128, 4, 3),   # prefill: [64 x 128] outputs per step, B read once per 64 tokens
}
TARGET_PROGRAMS = 1024      # as lora_shrink: ~8 programs a streaming multiprocessor
MAX_COLUMN_BLOCKS = 8       # column blocks one program loops over (each program reads the partials once)


def column_blocks_per_program(n_tiles: int, n_slices: int, n_col_blocks: int) -> int:
    """Each program sums a tile's split-K partials once, then writes this many column blocks: as few
    programs as still fill the card, so the partials are re-read as few times as possible."""
    return max(1, min(MAX_COLUMN_BLOCKS, max(n_tiles, 1) * n_slices * n_col_blocks // TARGET_PROGRAMS))


def lora_expand_ref(y: torch.Tensor, xa: torch.Tensor, pool: torch.Tensor, b_rows: torch.Tensor,
                    ranks: torch.Tensor, scales: torch.Tensor, tiles: torch.Tensor, tile_size: int,
                    slice_offsets: tuple[int, ...]) -> None:
    """Pure-torch reference; adds into y in place.

    y [T, slice_offsets[-1]]; xa float32 [split_k, n_slices, T, R] from lora_shrink; b_rows int64
    [n_slices, S, R]; ranks int32 [n_slices, S]; scales float32 [n_slices, S]; tiles and tile_size as in
    lora_shrink.
    for each tile (a, t0, n) with a >= 0, slice s:
        y[t0:t0+n, off[s]:off[s+1]] += (sum_j xa[j, s, t0:t0+n, :r] @ B[s, a, :r]) * scales[s, a]
    """
    for slot, lo, hi in tile_runs(tiles):
        for s in range(len(slice_offsets) - 1):
            r = int(ranks[s, slot])
            if r == 0:
                continue
            col_lo, col_hi = slice_offsets[s], slice_offsets[s + 1]
            cols = torch.arange(col_hi - col_lo, device=y.device)
            b = pool[b_rows[s, slot, :r, None] + cols]            # [r, d_out]
            xa_sum = xa[0, s, lo:hi, :r]
            for j in range(1, xa.shape[0]):
                xa_sum = xa_sum + xa[j, s, lo:hi, :r]
            y[lo:hi, col_lo:col_hi] += (xa_sum.to(y.dtype) @ b) * scales[s, slot].to(y.dtype)


@triton.jit
def _expand_kernel(y_ptr, xa_ptr, pool_ptr, b_rows_ptr, ranks_ptr, scales_ptr, tiles_ptr,
                   n_tokens, n_slots, max_rank, n_slices, split_k, stride_y, col_blocks, n_col_groups,
                   off0, off1, off2, off3,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    # grid: (tile, slice * column group); programs past the live tiles, a slice's width or rank 0 exit
    tile = tl.program_id(0)
    s = tl.program_id(1) // n_col_groups
    col_group = tl.program_id(1) % n_col_groups
    slot = tl.load(tiles_ptr + tile * 3)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + s * n_slots + slot)
    if rank == 0:
        return
    # slice s owns columns lo:hi of y (scalars, not a tensor, so nothing is copied to the device per call)
    lo = tl.where(s == 0, off0, tl.where(s == 1, off1, off2))
    width = tl.where(s == 0, off1, tl.where(s == 1, off2, off3)) - lo
    col_lo = col_group * col_blocks * BLOCK_N
    if col_lo >= width:
        return
    first = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    tokens = (first + tl.arange(0, BLOCK_M)).to(tl.int64)      # int64: tokens x stride may pass 2**31
    token_mask = tl.arange(0, BLOCK_M) < count
    ks = tl.arange(0, BLOCK_R)
    k_mask = ks < rank                                         # rank not padded: rows past it are not read
    xa_mask = token_mask[:, None] & k_mask[None, :]
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(0, split_k):                                # the split-K partials, in a fixed order
        xa += tl.load(xa_ptr + ((j * n_slices + s) * n_tokens + tokens[:, None]) * max_rank + ks[None, :],
                      mask=xa_mask, other=0.0)
    row_starts = tl.load(b_rows_ptr + (s * n_slots + slot) * max_rank + ks, mask=k_mask, other=0)
    scale = tl.load(scales_ptr + s * n_slots + slot)
    xa = xa.to(pool_ptr.dtype.element_ty)
    for c in range(0, tl.minimum(col_blocks, tl.cdiv(width - col_lo, BLOCK_N))):
        cols = col_lo + c * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < width
        b = tl.load(pool_ptr + row_starts[:, None] + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)            # [R, N]
        delta = tl.dot(xa, b, input_precision=DOT_PRECISION)                         # [M, N] fp32
        y_ptrs = y_ptr + tokens[:, None] * stride_y + lo + cols[None, :]
        mask = token_mask[:, None] & col_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta * scale).to(y.dtype), mask=mask)


@torch.inference_mode()
def lora_expand(y: torch.Tensor, xa: torch.Tensor, pool: torch.Tensor, b_rows: torch.Tensor,
                ranks: torch.Tensor, scales: torch.Tensor, tiles: torch.Tensor, tile_size: int,
                slice_offsets: tuple[int, ...]) -> None:
    """Triton version of lora_expand_ref (same arguments); adds into y in place, accumulating in fp32.
    Tensor-core tiles, up to 3 slices (q/k/v) in one launch, no host sync (graph-safe)."""
    split_k, n_slices, n_tokens, max_rank = xa.shape
    n_slots = b_rows.shape[1]
    assert y.dtype in (torch.float16, torch.bfloat16, torch.float32) and y.stride(1) == 1 and y.shape[0] == n_tokens
    assert xa.dtype == torch.float32 and xa.is_contiguous()
    assert pool.dim() == 1 and pool.dtype == y.dtype and pool.is_contiguous()
    assert b_rows.dtype == torch.int64 and b_rows.shape == (n_slices, n_slots, max_rank) and b_rows.is_contiguous()
    assert ranks.dtype == torch.int32 and ranks.shape == (n_slices, n_slots) and ranks.is_contiguous()
    assert scales.dtype == torch.float32 and scales.shape == (n_slices, n_slots) and scales.is_contiguous()
    assert tiles.dtype == torch.int32 and tiles.dim() == 2 and tiles.shape[1] == 3 and tiles.is_contiguous()
    assert 1 <= n_slices <= 3 and len(slice_offsets) == n_slices + 1 and slice_offsets[-1] == y.shape[1]
    if n_tokens == 0 or tiles.shape[0] == 0:
        return
    assert tile_size in EXPAND_CONFIGS, f"tile size {tile_size}: configured for {sorted(EXPAND_CONFIGS)}"
    block_n, warps, stages = EXPAND_CONFIGS[tile_size]
    offsets = list(slice_offsets) + [slice_offsets[-1]] * (4 - len(slice_offsets))
    max_width = max(hi - lo for lo, hi in zip(slice_offsets[:-1], slice_offsets[1:]))
    n_col_blocks = triton.cdiv(max_width, block_n)
    col_blocks = column_blocks_per_program(tiles.shape[0], n_slices, n_col_blocks)
    n_col_groups = triton.cdiv(n_col_blocks, col_blocks)
    grid = (tiles.shape[0], n_slices * n_col_groups)
    _expand_kernel[grid](y, xa, pool, b_rows, ranks, scales, tiles, n_tokens, n_slots, max_rank, n_slices, split_k,
                         y.stride(0), col_blocks, n_col_groups, *offsets,
                         BLOCK_M=tile_size, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(max_rank)),
                         DOT_PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
                         num_warps=warps, num_stages=stages)
