"""Scatter an adapter's rows into the page pool: dst[dst_start[i] + j] = src[src_start[i] + j * src_step[i]].

An adapter reaches the device as the bytes of its safetensors file; this lays them out as pool rows in one
launch: a row of lora_A is contiguous in the file (step 1), a row of B^T is a column of lora_B (step = rank),
so the transpose happens here, on the device, as the rows are written; values are cast to the pool's dtype.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


def _check(dst, src, dst_start, src_start, src_step, length) -> None:
    assert dst.dim() == 1 and src.dim() == 1 and dst.is_contiguous() and src.is_contiguous()
    assert dst.device == src.device == dst_start.device
    for index in (dst_start, src_start, src_step, length):
        assert index.dtype == torch.int64 and index.is_contiguous() and index.shape == dst_start.shape


def scatter_rows_ref(dst: torch.Tensor, src: torch.Tensor, dst_start: torch.Tensor, src_start: torch.Tensor,
                     src_step: torch.Tensor, length: torch.Tensor, max_len: int) -> None:
    """Pure-torch reference.

    dst, src 1-D (any floating dtypes); dst_start, src_start, src_step, length int64 [n_rows]; max_len >= every
    length. for each row i, j < length[i]:  dst[dst_start[i] + j] = src[src_start[i] + j * src_step[i]]
    """
    _check(dst, src, dst_start, src_start, src_step, length)
    for d, s, step, n in zip(dst_start.tolist(), src_start.tolist(), src_step.tolist(), length.tolist()):
        dst[d:d + n] = src[s:s + step * (n - 1) + 1:step]


@triton.jit
def _scatter_rows_kernel(dst_ptr, src_ptr, dst_start_ptr, src_start_ptr, src_step_ptr, length_ptr,
                         BLOCK: tl.constexpr):
    # grid: (row, block of the row). Programs of neighbouring rows run together, so the strided reads of B^T
    # rows (neighbouring columns of lora_B) share cache lines.
    row = tl.program_id(0)
    length = tl.load(length_ptr + row)
    start = tl.program_id(1) * BLOCK
    if start >= length:
        return
    cols = start + tl.arange(0, BLOCK)
    mask = cols < length
    src = tl.load(src_start_ptr + row) + cols.to(tl.int64) * tl.load(src_step_ptr + row)
    values = tl.load(src_ptr + src, mask=mask)
    tl.store(dst_ptr + tl.load(dst_start_ptr + row) + cols, values.to(dst_ptr.dtype.element_ty), mask=mask)


def scatter_rows(dst: torch.Tensor, src: torch.Tensor, dst_start: torch.Tensor, src_start: torch.Tensor,
                 src_step: torch.Tensor, length: torch.Tensor, max_len: int) -> None:
    """Triton version of scatter_rows_ref (same signature); one launch for all rows."""
    _check(dst, src, dst_start, src_start, src_step, length)
    if dst_start.numel() and max_len:
        grid = (dst_start.numel(), triton.cdiv(max_len, BLOCK))
        _scatter_rows_kernel[grid](dst, src, dst_start, src_start, src_step, length, BLOCK=BLOCK)
