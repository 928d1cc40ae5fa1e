"""Shared pieces of the kernel tests: device, dtypes, tolerances, and random mixed-adapter LoRA batches
laid out the way the engine's unified page pool holds them, with naive dense answers to check against."""
from dataclasses import dataclass

import pytest
import torch

from engine.lora import DECODE_TILE, PREFILL_TILE, lora_tiles

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The interpreter mis-computes tl.dot on bfloat16 inputs: bf16 runs only on a GPU.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(DEVICE == "cpu", reason="bf16 needs a GPU"))]

TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
              torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}

RANK_CHOICES = (1, 2, 3, 7, 8, 13, 16, 17, 31, 32, 64)
# none: base rows only; one: one adapter; mixed: adapters with base rows between them (a slot may come back);
# distinct: every run its own adapter; arrival: one token a run, adapters at random (nothing grouped)
PATTERNS = ("none", "one", "mixed", "distinct", "arrival")
TILE_SIZES = {"decode": DECODE_TILE, "prefill": PREFILL_TILE}
RUN_LENGTHS = {"decode": 20, "prefill": 80}   # longest run of one slot drawn for each form


@dataclass
class LoraCase:
    x: torch.Tensor               # [T, d_in]
    pool: torch.Tensor            # 1-D; rows of every adapter at scattered, unaligned offsets
    a_rows: torch.Tensor          # int64 [n_slices, S, R]; entries past a rank point at a NaN row
    b_rows: torch.Tensor
    ranks: torch.Tensor           # int32 [n_slices, S]
    scales: torch.Tensor          # float32 [n_slices, S]
    tiles: torch.Tensor           # int32 [n_tiles, 3]: the live tiles, then dead ones (slot -1) as a graph has
    tile_size: int
    slice_offsets: tuple[int, ...]
    a_dense: dict                 # (slice, slot) -> A^T [r, d_in]
    b_dense: dict                 # (slice, slot) -> B [r, d_out]
    token_slots: list[int]        # slot of each token

    def xa(self, split_k: int = 1) -> torch.Tensor:
        """A scratch buffer for lora_shrink, filled with NaN: entries nothing writes stay NaN."""
        n_slices, _, max_rank = self.a_rows.shape
        return torch.full((split_k, n_slices, self.x.shape[0], max_rank), float("nan"), device=DEVICE)


def token_runs(pattern: str, n_tokens: int, form: str, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Run lengths and slots: 'distinct' gives every run its own slot (slots 0..n_runs-1); the others use
    slots 0..3 and -1."""
    lengths = []
    longest = 1 if pattern == "arrival" else RUN_LENGTHS[form]
    while sum(lengths) < n_tokens:
        lengths.append(min(int(torch.randint(1, longest + 1, (1,), generator=gen)), n_tokens - sum(lengths)))
    n_runs = len(lengths)
    if pattern == "none":
        slots = [-1] * n_runs
    elif pattern == "one":
        slots = [2] * n_runs
    elif pattern in ("mixed", "arrival"):
        slots = torch.randint(-1, 4, (n_runs,), generator=gen).tolist()
    else:
        slots = list(range(n_runs))
    return lengths, slots


def make_lora_case(pattern: str, n_tokens: int, d_in: int, d_outs: tuple[int, ...], form: str,
                   dtype: torch.dtype, max_rank: int = 64, seed: int = 0) -> LoraCase:
    gen = torch.Generator().manual_seed(seed)
    lengths, slots = token_runs(pattern, n_tokens, form, gen)
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

    token_slots = [slot for slot, n in zip(slots, lengths) for _ in range(n)]
    tile_size = TILE_SIZES[form]
    # dead tiles after the live ones, pointing far outside the batch: a kernel that reads them fails
    dead = torch.tensor([[-1, 10 ** 6, tile_size]] * 2, dtype=torch.int32)
    tiles = torch.cat([torch.from_numpy(lora_tiles(token_slots, tile_size)), dead])
    offsets = tuple(torch.tensor((0,) + d_outs).cumsum(0).tolist())
    x = torch.randn(n_tokens, d_in, generator=gen)
    return LoraCase(x=x.to(DEVICE, dtype), pool=pool.flatten().to(DEVICE, dtype), a_rows=a_rows.to(DEVICE),
                    b_rows=b_rows.to(DEVICE), ranks=ranks.to(DEVICE), scales=scales.to(DEVICE),
                    tiles=tiles.to(DEVICE), tile_size=tile_size, slice_offsets=offsets, a_dense=a_dense,
                    b_dense=b_dense, token_slots=token_slots)


def shrink(op, case: LoraCase, split_k: int = 1, x: torch.Tensor | None = None) -> torch.Tensor:
    xa = case.xa(split_k)
    op(case.x if x is None else x, case.pool, case.a_rows, case.ranks, case.tiles, case.tile_size, xa)
    return xa


def expand(op, case: LoraCase, y: torch.Tensor, xa: torch.Tensor) -> None:
    op(y, xa, case.pool, case.b_rows, case.ranks, case.scales, case.tiles, case.tile_size, case.slice_offsets)


def written(case: LoraCase, xa: torch.Tensor) -> torch.Tensor:
    """xa where lora_shrink must write (tokens of an adapter, columns below its rank), NaN elsewhere: the
    entries nothing reads are left as they were, so both sides compare equal there."""
    mask = torch.zeros(xa.shape[1:], dtype=torch.bool)
    for t, slot in enumerate(case.token_slots):
        for s in range(xa.shape[1]):
            if slot >= 0:
                mask[s, t, :int(case.ranks[s, slot])] = True
    return torch.where(mask.to(xa.device), xa, float("nan"))


def dense_shrink(case: LoraCase) -> torch.Tensor:
    """xa in float64 straight from the per-adapter dense matrices, token by token (NaN where nothing is
    written, as `written` shows it)."""
    n_slices, _, max_rank = case.a_rows.shape
    x = case.x.double().cpu()
    xa = torch.full((n_slices, x.shape[0], max_rank), float("nan"), dtype=torch.float64)
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
