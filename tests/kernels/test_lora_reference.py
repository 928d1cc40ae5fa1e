"""The LoRA references against a naive dense computation: x @ A.T @ B * scale per token, adapter by adapter."""
import pytest
import torch
from torch.testing import assert_close

from kernel_cases import DEVICE, PATTERNS, dense_lora_delta, dense_shrink, expand, make_lora_case, shrink, written
from kernels import lora_expand_ref, lora_shrink_ref


@pytest.mark.parametrize("d_outs", [(48,), (40, 17), (40, 17, 33)])
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("form", ["decode", "prefill"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_references_match_dense_lora(pattern, form, split_k, d_outs):
    case = make_lora_case(pattern, 24, 137, d_outs, form, torch.float32, seed=1)
    xa = shrink(lora_shrink_ref, case, split_k)
    assert_close(written(case, xa).sum(0).cpu().double(), dense_shrink(case), atol=1e-5, rtol=1e-5, equal_nan=True)

    y0 = torch.randn(24, case.slice_offsets[-1], device=DEVICE)
    y = y0.clone()
    expand(lora_expand_ref, case, y, xa)
    assert_close((y - y0).cpu().double(), dense_lora_delta(case), atol=1e-5, rtol=1e-5)
    if pattern == "none":
        assert torch.equal(y, y0)
