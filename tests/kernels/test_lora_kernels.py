"""Triton LoRA shrink/expand against the references: shapes x slices x mixed ranks 1-64 x tile patterns x
decode and prefill tiles x split-K x dtypes; bf16 only on a GPU."""
import pytest
import torch
from torch.testing import assert_close

from kernel_cases import (DEVICE, DTYPES, PATTERNS, TOLERANCES, dense_lora_delta, expand, make_lora_case, shrink,
                          written)
from kernels import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref
from kernels.lora_shrink import lora_split_k

# (tokens, d_in, d_out of each slice): one, two (gate/up) and three (q/k/v, GQA-narrow k/v) slices, odd sizes.
# The interpreter runs one program at a time, so the sweep stays small; the bigger cases are marked slow.
SHAPES = [(8, 64, (64,)), (10, 257, (40, 17)), (24, 130, (128, 32, 32))]
BIG_SHAPES = [(24, 2049, (2049,)), (70, 512, (512, 128, 128))]
FORMS = ["decode", "prefill"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_tokens,d_in,d_outs", SHAPES)
def test_shrink_matches_reference(n_tokens, d_in, d_outs, pattern, form, split_k, dtype):
    case = make_lora_case(pattern, n_tokens, d_in, d_outs, form, dtype)
    xa = shrink(lora_shrink, case, split_k)
    assert_close(written(case, xa), written(case, shrink(lora_shrink_ref, case, split_k)), equal_nan=True,
                 **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n_tokens,d_in,d_outs", SHAPES)
def test_expand_matches_reference(n_tokens, d_in, d_outs, pattern, form, split_k, dtype):
    case = make_lora_case(pattern, n_tokens, d_in, d_outs, form, dtype)
    xa = shrink(lora_shrink_ref, case, split_k)                 # NaN wherever expand must not read
    y0 = torch.randn(n_tokens, case.slice_offsets[-1], generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    y, y_ref = y0.clone(), y0.clone()
    expand(lora_expand, case, y, xa)
    expand(lora_expand_ref, case, y_ref, xa)
    assert_close(y, y_ref, **TOLERANCES[dtype])
    if pattern == "none":
        assert torch.equal(y, y0)


def check_shrink_then_expand(case, dtype: torch.dtype, split_k: int = 1) -> None:
    y = torch.zeros(case.x.shape[0], case.slice_offsets[-1], dtype=dtype, device=DEVICE)
    expand(lora_expand, case, y, shrink(lora_shrink, case, split_k))
    assert_close(y.cpu().double(), dense_lora_delta(case), **TOLERANCES[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n_tokens,d_in,d_outs", BIG_SHAPES)
def test_bigger_shapes_match_dense(n_tokens, d_in, d_outs, form):
    case = make_lora_case("mixed", n_tokens, d_in, d_outs, form, torch.float16)
    check_shrink_then_expand(case, torch.float16, split_k=lora_split_k(case.tiles.shape[0], len(d_outs), 64, d_in,
                                                                       case.tile_size))


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_runs_span_several_tiles_and_ranks_end_mid_block(dtype):
    """Runs of 70 and 77 tokens (several prefill tiles each, the last partial) around 3 base rows; R = 24."""
    case = make_lora_case("one", 150, 48, (32, 24), "prefill", dtype, max_rank=24, seed=5)
    case.token_slots = [1] * 70 + [-1] * 3 + [3] * 77
    case.tiles = torch.tensor([[1, 0, 64], [1, 64, 6], [3, 73, 64], [3, 137, 13], [-1, 0, 64]], dtype=torch.int32,
                              device=DEVICE)
    check_shrink_then_expand(case, dtype, split_k=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_shrink_then_expand_on_strided_views_match_dense(form, dtype):
    """x and y as column slices of wider buffers (as a fused projection's output would be); R = 20."""
    case = make_lora_case("mixed", 13, 96, (64, 48), form, dtype, max_rank=20, seed=3)
    x = torch.zeros(13, 200, dtype=dtype, device=DEVICE)[:, 50:146]
    x.copy_(case.x)
    y_buffer = torch.zeros(13, 150, dtype=dtype, device=DEVICE)
    expand(lora_expand, case, y_buffer[:, 20:132], shrink(lora_shrink, case, 2, x))
    assert_close(y_buffer[:, 20:132].cpu().double(), dense_lora_delta(case), **TOLERANCES[dtype])
    assert not y_buffer[:, :20].any() and not y_buffer[:, 132:].any()


def test_split_k_partials_add_up_to_one_piece():
    """Partials of any split sum to the unsplit product; splits past d_in hold zeros."""
    case = make_lora_case("distinct", 20, 130, (64, 16), "decode", torch.float32, seed=7)
    whole = written(case, shrink(lora_shrink, case, 1))[0]
    for split_k in (2, 5):                      # chunks of 128 and 64 elements of 130: 5 splits leave 2 empty
        parts = written(case, shrink(lora_shrink, case, split_k))
        assert_close(parts.sum(0), whole, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert (parts[3:].nan_to_num() == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_batch_gives_bit_identical_results(dtype):
    """Deterministic: the split-K partials are added in a fixed order (no atomics)."""
    case = make_lora_case("mixed", 40, 256, (128, 64, 64), "decode", dtype, seed=8)
    runs = []
    for _ in range(2):
        y = torch.zeros(40, case.slice_offsets[-1], dtype=dtype, device=DEVICE)
        expand(lora_expand, case, y, shrink(lora_shrink, case, 4))
        runs.append(y)
    assert torch.equal(*runs)


def test_split_k_fills_the_card_only_when_tiles_are_few():
    assert lora_split_k(4, 3, 64, 4096, 16) > lora_split_k(32, 3, 64, 4096, 16) >= 1
    assert lora_split_k(4, 3, 64, 64, 16) == 1                  # a tiny d_in is never split
    assert lora_split_k(200, 3, 64, 4096, 64) == 1              # a big prefill has tiles enough


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
def test_tiles_replay_in_a_cuda_graph_with_new_adapters():
    """No host sync: capture once with a worst-case tile table, then write new tiles in place and replay."""
    case = make_lora_case("mixed", 32, 256, (256, 64, 64), "decode", torch.float16, seed=4)
    tiles = torch.full((12, 3), -1, dtype=torch.int32, device=DEVICE)
    case.tiles = tiles
    xa = case.xa(2)
    y = torch.zeros(32, case.slice_offsets[-1], dtype=torch.float16, device=DEVICE)

    def run():
        lora_shrink(case.x, case.pool, case.a_rows, case.ranks, tiles, case.tile_size, xa)
        expand(lora_expand, case, y, xa)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()                                                   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed in range(3):
        new = make_lora_case("mixed", 32, 256, (256, 64, 64), "decode", torch.float16, seed=4 + seed)
        live = new.tiles[new.tiles[:, 0] >= 0]
        tiles.fill_(-1)
        tiles[:live.shape[0]] = live
        case.token_slots = new.token_slots
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y.cpu().double(), dense_lora_delta(case), **TOLERANCES[torch.float16])
