"""Triton LoRA shrink/expand against the references: shapes x slices x mixed ranks 1-64 x index patterns x
both forms (decode gather, prefill segments) x dtypes; bf16 only on a GPU."""
import pytest
import torch
from torch.testing import assert_close

from kernel_cases import (DEVICE, DTYPES, PATTERNS, TOLERANCES, LoraCase, dense_lora_delta, make_lora_case,
                          xa_past_rank_nan)
from kernels import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

# (tokens, d_in, d_out of each slice): one, two (gate/up) and three (q/k/v, GQA-narrow k/v) slices, odd sizes.
# The interpreter runs one program at a time, so the sweep stays small; the bigger cases are marked slow.
SHAPES = [(8, 64, (64,)), (10, 257, (40, 17)), (12, 130, (128, 32, 32))]
BIG_SHAPES = [(8, 2049, (2049,)), (16, 512, (512, 128, 128))]


def shrink(op, case: LoraCase, x: torch.Tensor | None = None) -> torch.Tensor:
    return op(case.x if x is None else x, case.pool, case.a_rows, case.ranks, case.seg_starts, case.seg_slots,
              case.max_seg_len)


def expand(op, case: LoraCase, y: torch.Tensor, xa: torch.Tensor) -> None:
    op(y, xa, case.pool, case.b_rows, case.ranks, case.scales, case.seg_starts, case.seg_slots,
       case.max_seg_len, case.slice_offsets)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_tokens,d_in,d_outs", SHAPES)
def test_shrink_matches_reference(n_tokens, d_in, d_outs, pattern, decode, dtype):
    case = make_lora_case(pattern, n_tokens, d_in, d_outs, decode, dtype)
    xa = shrink(lora_shrink, case)
    assert xa.dtype == torch.float32 and xa.shape == case.a_rows.shape[:1] + (n_tokens, case.a_rows.shape[2])
    assert_close(xa, shrink(lora_shrink_ref, case), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_tokens,d_in,d_outs", SHAPES)
def test_expand_matches_reference(n_tokens, d_in, d_outs, pattern, decode, dtype):
    case = make_lora_case(pattern, n_tokens, d_in, d_outs, decode, dtype)
    xa = xa_past_rank_nan(case, shrink(lora_shrink_ref, case))       # NaN wherever expand must not read
    y0 = torch.randn(n_tokens, case.slice_offsets[-1], generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    y, y_ref = y0.clone(), y0.clone()
    expand(lora_expand, case, y, xa)
    expand(lora_expand_ref, case, y_ref, xa)
    assert_close(y, y_ref, **TOLERANCES[dtype])
    if pattern == "none":
        assert torch.equal(y, y0)


def check_shrink_then_expand(case: LoraCase, dtype: torch.dtype) -> None:
    y = torch.zeros(case.x.shape[0], case.slice_offsets[-1], dtype=dtype, device=DEVICE)
    expand(lora_expand, case, y, shrink(lora_shrink, case))
    assert_close(y.cpu().double(), dense_lora_delta(case), **TOLERANCES[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("n_tokens,d_in,d_outs", BIG_SHAPES)
def test_bigger_shapes_match_dense(n_tokens, d_in, d_outs, decode):
    check_shrink_then_expand(make_lora_case("mixed", n_tokens, d_in, d_outs, decode, torch.float16), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_segments_span_several_token_blocks(dtype):
    case = make_lora_case("mixed", 150, 48, (32, 24), False, dtype, max_rank=24, seed=5)
    case.seg_starts = torch.tensor([0, 70, 73, 150], dtype=torch.int32, device=DEVICE)
    case.seg_slots = torch.tensor([1, -1, 3], dtype=torch.int32, device=DEVICE)
    case.token_slots, case.max_seg_len = [1] * 70 + [-1] * 3 + [3] * 77, 77
    check_shrink_then_expand(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
def test_shrink_then_expand_on_strided_views_match_dense(decode, dtype):
    """x and y as column slices of wider buffers (as a fused projection's output would be); R = 20."""
    case = make_lora_case("mixed", 13, 96, (64, 48), decode, dtype, max_rank=20, seed=3)
    x = torch.zeros(13, 200, dtype=dtype, device=DEVICE)[:, 50:146]
    x.copy_(case.x)
    y_buffer = torch.zeros(13, 150, dtype=dtype, device=DEVICE)
    expand(lora_expand, case, y_buffer[:, 20:132], shrink(lora_shrink, case, x))
    assert_close(y_buffer[:, 20:132].cpu().double(), dense_lora_delta(case), **TOLERANCES[dtype])
    assert not y_buffer[:, :20].any() and not y_buffer[:, 132:].any()


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
def test_decode_form_replays_in_a_cuda_graph_with_new_adapter_indices():
    """No host sync in the gather form: capture once, then change slots in place and replay."""
    case = make_lora_case("mixed", 32, 256, (256, 64, 64), True, torch.float16, seed=4)
    y = torch.zeros(32, case.slice_offsets[-1], dtype=torch.float16, device=DEVICE)
    run = lambda: expand(lora_expand, case, y, shrink(lora_shrink, case))  # noqa: E731
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()                                                   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in range(3):
        new_slots = torch.randint(-1, 4, (32,), generator=torch.Generator().manual_seed(seed))
        case.seg_slots.copy_(new_slots)
        case.token_slots = new_slots.tolist()
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y.cpu().double(), dense_lora_delta(case), **TOLERANCES[torch.float16])
