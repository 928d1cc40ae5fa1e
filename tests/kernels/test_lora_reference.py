"""The LoRA references against a naive dense computation: x @ A.T @ B * scale per token, adapter by adapter."""
import pytest
import torch
from torch.testing import assert_close

from kernel_cases import DEVICE, PATTERNS, dense_lora_delta, dense_shrink, make_lora_case
from kernels import lora_expand_ref, lora_shrink_ref


@pytest.mark.parametrize("d_outs", [(48,), (40, 17), (40, 17, 33)])
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_references_match_dense_lora(pattern, decode, d_outs):
    case = make_lora_case(pattern, 24, 37, d_outs, decode, torch.float32, seed=1)
    xa = lora_shrink_ref(case.x, case.pool, case.a_rows, case.ranks, case.seg_starts, case.seg_slots,
                         case.max_seg_len)
    assert xa.dtype == torch.float32 and not xa.isnan().any()
    assert_close(xa.cpu().double(), dense_shrink(case), atol=1e-5, rtol=1e-5)

    y0 = torch.randn(24, case.slice_offsets[-1], device=DEVICE)
    y = y0.clone()
    lora_expand_ref(y, xa, case.pool, case.b_rows, case.ranks, case.scales, case.seg_starts, case.seg_slots,
                    case.max_seg_len, case.slice_offsets)
    assert_close((y - y0).cpu().double(), dense_lora_delta(case), atol=1e-5, rtol=1e-5)
    if pattern == "none":
        assert torch.equal(y, y0)
