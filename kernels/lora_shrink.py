"""LoRA shrink for a mixed-adapter batch: xa[., s, t, :r] = x[t] @ A_s[slot(t)]^T  (r = that adapter's rank).

Tokens come grouped by adapter slot (the engine orders every batch by slot) and cut into tiles: row i of
`tiles` [n_tiles, 3] int32 is (slot, first token, token count <= tile_size). A tile with slot -1 does
nothing: a CUDA graph's table is sized for the worst case and its unused tail is -1. Base-model tokens
are in no tile. Adapter weights live in the unified page pool as rows (S-LoRA): row k of A^T for
(slice s, slot a) starts at element offset a_rows[s, a, k] of the flat pool and is d_in long. Rows past
an adapter's rank are never read, so ranks are not padded in compute.

Split-K: xa [split_k, n_slices, T, R] float32 holds partial sums, xa[j] over the j-th chunk of d_in
(split_chunk(d_in, split_k) elements each; trailing chunks may be empty and hold zeros). lora_expand adds
the partials up in a fixed order, so a batch gives bit-identical results run after run (no atomics).
Entries of tokens in no tile, and columns past a rank, are left as they were: nothing reads them.
"""
import torch
import triton
import triton.language as tl

# Launch configurations by tile size (the tile table decides it: lora.DECODE_TILE, lora.PREFILL_TILE), from
# bytes, not yet tuned on a GPU. (BLOCK_N: rank rows a program computes, BLOCK_K: d_in step, warps, stages)
SHRINK_CONFIGS = {
    # decode: a tile holds one adapter's tokens of one step (1-16). 16 rank rows a program (rank 8 wastes
    # half an MMA, never a byte: masked rows are not read), 256-long K steps keep ~40 KB of A and x in
    # flight per program; split-K (below) supplies the programs that few tiles cannot.
    16: (16, 256, 4, 3),
    # prefill: 64-token tiles already number T/64 + segments; 64 rank rows read each x tile once per slice.
    64: (64, 64, 4, 3),
}
TARGET_PROGRAMS = 1024      # ~8 a streaming multiprocessor on a 132-SM H100/H200: enough bytes in flight
MIN_SPLIT_ELEMENTS = 256    # a split streams at least this much of d_in (one BLOCK_K step at decode)


def split_chunk(d_in: int, split_k: int) -> int:
    """Elements of d_in in each split: a multiple of 64, so every chunk starts aligned for vector loads."""
    return triton.cdiv(triton.cdiv(d_in, split_k), 64) * 64


def lora_split_k(n_tiles: int, n_slices: int, max_rank: int, d_in: int, tile_size: int) -> int:
    """How many splits of d_in the Triton shrink uses: enough programs to fill the card when tiles are few
    (one adapter at batch 64 is 4 tiles), none when they are many (lora_expand re-reads every partial)."""
    block_n = SHRINK_CONFIGS[tile_size][0]
    programs = max(n_tiles, 1) * n_slices * triton.cdiv(max_rank, block_n)
    return max(1, min(TARGET_PROGRAMS // programs, d_in // MIN_SPLIT_ELEMENTS))


def lora_split_k_ref(n_tiles: int, n_slices: int, max_rank: int, d_in: int, tile_size: int) -> int:
    """The references compute d_in in one piece (the CPU path: no card to fill)."""
    return 1


def tile_runs(tiles: torch.Tensor) -> list[tuple[int, int, int]]:
    """(slot, first token, end) of each run of consecutive tiles that continue one another with one slot:
    the references compute a run as one matmul."""
    runs = []
    for slot, first, count in tiles.tolist():
        if slot < 0 or count <= 0:
            continue
        if runs and runs[-1][0] == slot and runs[-1][2] == first:
            runs[-1] = (slot, runs[-1][1], first + count)
        else:
            runs.append((slot, first, first + count))
    return runs


def lora_shrink_ref(x: torch.Tensor, pool: torch.Tensor, a_rows: torch.Tensor, ranks: torch.Tensor,
                    tiles: torch.Tensor, tile_size: int, xa: torch.Tensor) -> None:
    """Pure-torch reference; writes xa in place.

    x [T, d_in]; pool 1-D, x's dtype; a_rows int64 [n_slices, S, R]; ranks int32 [n_slices, S] (0 = the
    adapter does not target that slice); tiles int32 [n_tiles, 3] (slot, first, count); tile_size: the
    most tokens a tile holds; xa float32 [split_k, n_slices, T, R].
    for each tile (a, t0, n) with a >= 0, slice s, split j:
        xa[j, s, t0:t0+n, :r] = x[t0:t0+n, chunk j] @ A[s, a, :r, chunk j].T
    """
    split_k, n_slices = xa.shape[:2]
    d_in = x.shape[1]
    chunk = split_chunk(d_in, split_k)
    cols = torch.arange(d_in, device=x.device)
    for slot, lo, hi in tile_runs(tiles):
        for s in range(n_slices):
            r = int(ranks[s, slot])
            if r == 0:
                continue
            a_t = pool[a_rows[s, slot, :r, None] + cols]          # [r, d_in]
            for j in range(split_k):
                k = slice(j * chunk, (j + 1) * chunk)
                xa[j, s, lo:hi, :r] = (x[lo:hi, k] @ a_t[:, k].T).float()


@triton.jit
def _shrink_kernel(x_ptr, pool_ptr, a_rows_ptr, ranks_ptr, tiles_ptr, xa_ptr,
                   n_tokens, d_in, n_slots, max_rank, n_slices, stride_x, chunk,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    # grid: (tile, slice * rank block, split of d_in); programs past the live tiles or a rank exit at once
    tile = tl.program_id(0)
    n_rank_blocks = tl.cdiv(max_rank, BLOCK_N)
    s = tl.program_id(1) // n_rank_blocks
    rank_block = tl.program_id(1) % n_rank_blocks
    split = tl.program_id(2)
    slot = tl.load(tiles_ptr + tile * 3)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + s * n_slots + slot)
    if rank_block * BLOCK_N >= rank:
        return
    first = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    tokens = (first + tl.arange(0, BLOCK_M)).to(tl.int64)      # int64: tokens x stride may pass 2**31
    token_mask = tl.arange(0, BLOCK_M) < count
    rows = rank_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < rank
    row_starts = tl.load(a_rows_ptr + (s * n_slots + slot) * max_rank + rows, mask=row_mask, other=0)
    k_lo = split * chunk
    k_hi = tl.minimum(k_lo + chunk, d_in)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):                         # an empty split stores zeros
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_hi
        x = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :],
                    mask=token_mask[:, None] & k_mask[None, :], other=0.0)          # [M, K]
        a = tl.load(pool_ptr + row_starts[:, None] + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)            # [N, K]
        acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)
    xa_ptrs = xa_ptr + ((split * n_slices + s) * n_tokens + tokens[:, None]) * max_rank + rows[None, :]
    tl.store(xa_ptrs, acc, mask=token_mask[:, None] & row_mask[None, :])


@torch.inference_mode()
def lora_shrink(x: torch.Tensor, pool: torch.Tensor, a_rows: torch.Tensor, ranks: torch.Tensor,
                tiles: torch.Tensor, tile_size: int, xa: torch.Tensor) -> None:
    """Triton version of lora_shrink_ref (same arguments, same result): tensor-core tiles of one adapter's
    tokens, all slices and splits of d_in in one launch, no host sync (graph-safe), no allocation."""
    n_slices, n_slots, max_rank = a_rows.shape
    n_tokens, d_in = x.shape
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.stride(1) == 1
    assert pool.dim() == 1 and pool.dtype == x.dtype and pool.is_contiguous()
    assert a_rows.dtype == torch.int64 and a_rows.is_contiguous()
    assert ranks.dtype == torch.int32 and ranks.shape == (n_slices, n_slots) and ranks.is_contiguous()
    assert tiles.dtype == torch.int32 and tiles.dim() == 2 and tiles.shape[1] == 3 and tiles.is_contiguous()
    assert xa.dtype == torch.float32 and xa.shape[1:] == (n_slices, n_tokens, max_rank) and xa.is_contiguous()
    assert tile_size in SHRINK_CONFIGS, f"tile size {tile_size}: configured for {sorted(SHRINK_CONFIGS)}"
    if n_tokens == 0 or tiles.shape[0] == 0:
        return
    block_n, block_k, warps, stages = SHRINK_CONFIGS[tile_size]
    split_k = xa.shape[0]
    grid = (tiles.shape[0], n_slices * triton.cdiv(max_rank, block_n), split_k)
    _shrink_kernel[grid](x, pool, a_rows, ranks, tiles, xa, n_tokens, d_in, n_slots, max_rank, n_slices,
                         x.stride(0), split_chunk(d_in, split_k),
                         BLOCK_M=tile_size, BLOCK_N=block_n, BLOCK_K=block_k,
                         DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                         num_warps=warps, num_stages=stages)
