"""bench_kernels' batches on CPU (Triton interpreter), small shapes: every form builds a batch the kernels,
the reference and the per-adapter loop agree on. No timing: the benchmark itself needs a GPU."""
import pytest
import torch

from bench.bench_kernels import FORMS, IMPLS, check, make_batch


@pytest.mark.parametrize("form", FORMS)
def test_every_form_gives_one_answer_from_each_implementation(form, monkeypatch):
    small = {"decode": 48, "per-token": 48, "prefill": 96}                 # 256 and 4,096: slow in the interpreter
    monkeypatch.setitem(FORMS, form, (small[form], FORMS[form][1]))
    b = make_batch(64, (64, 32), 6, form, "cpu", torch.float16, torch.Generator().manual_seed(0))
    live = b.tiles[b.tiles[:, 0] >= 0]
    assert int(live[:, 2].sum()) == b.x.shape[0]                           # every token in one live tile
    if form == "decode":
        assert (b.tiles[live.shape[0]:, 0] == -1).all() and b.tiles.shape[0] > live.shape[0]
    if form == "per-token":                     # arrival order: runs only where neighbours happen to match
        assert live.shape[0] > b.x.shape[0] // 2
    check(b, 96)
    y_triton, y_loop = (torch.zeros(b.x.shape[0], 96, dtype=torch.float16) for _ in range(2))
    IMPLS["triton"](b, y_triton)
    IMPLS["per-adapter"](b, y_loop)
    torch.testing.assert_close(y_triton, y_loop, atol=2e-2, rtol=2e-2)
