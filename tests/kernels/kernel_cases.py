"""Shared pieces of the kernel tests: device, dtypes, tolerances, and random mixed-adapter LoRA batches
laid out the way the engine's unified page pool holds them, with naive dense answers to check against."""
from dataclasses import dataclass

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The interpreter mis-computes tl.dot on bfloat16 inputs: bf16 runs only on a GPU.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(DEVICE == "cpu", reason="bf16 needs a GPU"))]

TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}

RANK_CHOICES = (1, 2, 3, 7, 8, 13, 16, 17, 31, 32, 64)
PATTERNS = ("none", "one", "mixed", "distinct")


@dataclass
class LoraCase:
    x: torch.Tensor               # [T, d_in]
    pool: torch.Tensor            # 1-D; rows of every adapter at scattered, unaligned offsets
    a_rows: torch.Tensor          # int64 [n_slices, S, R]; entries past a rank point at a NaN row
    b_rows: torch.Tensor
    ranks: torch.Tensor           # int32 [n_slices, S]
    scales: torch.Tensor          # float32 [n_slices, S]
    seg_starts: torch.Tensor      # int32 [n_seg + 1]
    seg_slots: torch.Tensor       # int32 [n_seg]
    max_seg_len: int
    slice_offsets: tuple[int, ...]
    a_dense: dict                 # (slice, slot) -> A^T [r, d_in]
    b_dense: dict                 # (slice, slot) -> B [r, d_out]
    token_slots: list[int]        # slot of each token


def segments(pattern: str, n_tokens: int, decode: bool, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Segment lengths and slots: decode has one token a segment; 'distinct' gives every segment its own
    slot (slots 0..n_seg-1); the others use slots 0..3 and -1."""
    if decode:
        lengths = [1] * n_tokens
    else:
        lengths = []
        while sum(lengths) < n_tokens:
            lengths.append(min(int(torch.randint(1, 9, (1,), generator=gen)), n_tokens - sum(lengths)))
    n_seg = len(lengths)
    if pattern == "none":
        slots = [-1] * n_seg
    elif pattern == "one":
        slots = [2] * n_seg
    elif pattern == "mixed":
        slots = torch.randint(-1, 4, (n_seg,), generator=gen).tolist()
    else:
        slots = list(range(n_seg))
    return lengths, slots


def make_lora_case(pattern: str, n_tokens: int, d_in: int, d_outs: tuple[int, ...], decode: bool,
                   dtype: torch.dtype, max_rank: int = 64, seed: int = 0) -> LoraCase:
    gen = torch.Generator().manual_seed(seed)
    lengths, slots = segments(pattern, n_tokens, decode, gen)
    n_slices, n_slots = len(d_outs), max(4, len(slots))
    choices = torch.tensor([r for r in RANK_CHOICES if r <= max_rank])
    ranks = choices[torch.randint(0, len(choices), (n_slices, n_slots), generator=gen)].to(torch.int32)
    ranks[0, 2] = max_rank                                   # the 'one' slot has the largest rank
    if n_slices > 1:
        ranks[-1, 0] = 0                                     # slot 0 does not target the last slice
    scales = torch.rand(n_slices, n_slots, generator=gen) + 0.5

    width = max(d_in, *d_outs) + 3                           # +3: rows start at unaligned offsets
    n_rows = 2 * int(ranks.sum()) + 1
    free_rows = torch.randperm(n_rows, generator=gen)
    pool = torch.randn(n_rows, width, generator=gen)
    poison, free_rows = int(free_rows[0]), free_rows[1:]
    pool[poison] = float("nan")                              # reading a row past a rank poisons the result
    a_rows = torch.full((n_slices, n_slots, max_rank), poison * width, dtype=torch.int64)
    b_rows = a_rows.clone()
    a_dense, b_dense = {}, {}
    for s, d_out in enumerate(d_outs):
        for slot in range(n_slots):
            r = int(ranks[s, slot])
            a = torch.randn(r, d_in, generator=gen) / d_in ** 0.5
            b = torch.randn(r, d_out, generator=gen) / max(r, 1) ** 0.5
            rows_a, rows_b, free_rows = free_rows[:r], free_rows[r:2 * r], free_rows[2 * r:]
            pool[rows_a, :d_in], pool[rows_b, :d_out] = a, b
            a_rows[s, slot, :r], b_rows[s, slot, :r] = rows_a * width, rows_b * width
            a_dense[s, slot], b_dense[s, slot] = a.to(dtype).double(), b.to(dtype).double()

    starts = torch.tensor([0] + lengths).cumsum(0)
    token_slots = [slot for slot, n in zip(slots, lengths) for _ in range(n)]
    offsets = tuple(torch.tensor((0,) + d_outs).cumsum(0).tolist())
    x = torch.randn(n_tokens, d_in, generator=gen)
    return LoraCase(x=x.to(DEVICE, dtype), pool=pool.flatten().to(DEVICE, dtype), a_rows=a_rows.to(DEVICE),
                    b_rows=b_rows.to(DEVICE), ranks=ranks.to(DEVICE), scales=scales.to(DEVICE),
                    seg_starts=starts.to(DEVICE, torch.int32), max_seg_len=max(lengths),
                    seg_slots=torch.tensor(slots, dtype=torch.int32, device=DEVICE),
                    slice_offsets=offsets, a_dense=a_dense, b_dense=b_dense, token_slots=token_slots)


def dense_shrink(case: LoraCase) -> torch.Tensor:
    """xa in float64 straight from the per-adapter dense matrices, token by token."""
    n_slices, _, max_rank = case.a_rows.shape
    x = case.x.double().cpu()
    xa = torch.zeros(n_slices, x.shape[0], max_rank, dtype=torch.float64)
    for t, slot in enumerate(case.token_slots):
        for s in range(n_slices):
            if slot >= 0:
                a = case.a_dense[s, slot]
                xa[s, t, :a.shape[0]] = x[t] @ a.T
    return xa


def dense_lora_delta(case: LoraCase) -> torch.Tensor:
    """scale * x @ A.T @ B for every token and slice, in float64: what shrink then expand must add."""
    x = case.x.double().cpu()
    delta = torch.zeros(x.shape[0], case.slice_offsets[-1], dtype=torch.float64)
    for t, slot in enumerate(case.token_slots):
        for s, (lo, hi) in enumerate(zip(case.slice_offsets[:-1], case.slice_offsets[1:])):
            if slot >= 0:
                delta[t, lo:hi] = x[t] @ case.a_dense[s, slot].T @ case.b_dense[s, slot] * float(case.scales[s, slot])
    return delta


def xa_past_rank_nan(case: LoraCase, xa: torch.Tensor) -> torch.Tensor:
    """A copy of xa with NaN past each token's rank, so an expand that reads past a rank shows it."""
    xa = xa.clone()
    for t, slot in enumerate(case.token_slots):
        for s in range(xa.shape[0]):
            xa[s, t, int(case.ranks[s, slot]) if slot >= 0 else 0:] = float("nan")
    return xa
