"""The adapter row scatter against its reference: A rows (step 1) and B^T rows (step = rank, a transpose),
rows of mixed lengths at unaligned offsets, source dtypes cast to the pool's."""
import pytest
import torch

from kernel_cases import DEVICE
from kernels import scatter_rows, scatter_rows_ref

CASTS = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float16),
         pytest.param(torch.bfloat16, torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="GPU"))]


def random_rows(n_rows: int, max_len: int, src_numel: int, seed: int):
    """Rows of random length, source start and step (1 or a rank), written to disjoint unaligned places."""
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(1, max_len + 1, (n_rows,), generator=g)
    step = torch.where(torch.rand(n_rows, generator=g) < 0.5, 1, torch.randint(2, 65, (n_rows,), generator=g))
    span = (length - 1) * step + 1
    src_start = (torch.rand(n_rows, generator=g) * (src_numel - span)).long()
    gaps = torch.randint(0, 5, (n_rows,), generator=g)
    dst_start = torch.cumsum(length + gaps, 0) - length
    return [t.to(DEVICE) for t in (dst_start, src_start, step, length)], int((dst_start + length).max()) + 3


@pytest.mark.parametrize("src_dtype, dst_dtype", CASTS)
@pytest.mark.parametrize("n_rows, max_len", [(1, 1), (5, 1030), (40, 200), (300, 64)])
def test_scatter_rows_matches_reference(n_rows, max_len, src_dtype, dst_dtype):
    src_numel = 40_000
    index, dst_numel = random_rows(n_rows, max_len, src_numel, seed=n_rows)
    src = torch.randn(src_numel, generator=torch.Generator().manual_seed(1)).to(DEVICE, src_dtype)
    dst0 = torch.full((dst_numel,), -7.0, dtype=dst_dtype, device=DEVICE)   # untouched between rows
    dst, dst_ref = dst0.clone(), dst0.clone()
    scatter_rows(dst, src, *index, max_len)
    scatter_rows_ref(dst_ref, src, *index, max_len)
    assert torch.equal(dst, dst_ref)
    dst_start, src_start, step, length = (t.tolist() for t in index)
    i = n_rows // 2                                      # the reference itself, one row by hand
    expected = [src[src_start[i] + j * step[i]].to(dst_dtype) for j in range(length[i])]
    assert torch.equal(dst_ref[dst_start[i]:dst_start[i] + length[i]], torch.stack(expected))
    assert (dst_ref == -7).sum() == dst_numel - sum(length)


def test_no_rows_is_a_no_op():
    dst = torch.zeros(8, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    scatter_rows(dst, torch.ones(8, device=DEVICE), empty, empty, empty, empty, 0)
    assert not dst.any()
