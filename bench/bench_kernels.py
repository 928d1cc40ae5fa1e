"""Achieved GB/s of the LoRA shrink + expand kernels on Llama-2-7B shapes, against a device copy's bandwidth
measured in the same run, the torch reference and a per-adapter loop.

Forms (rows of one table):
  decode     256 tokens grouped by adapter (what the engine runs: the running batch is kept in slot order),
             cut into 16-token tiles, with the worst-case tile table a CUDA graph replays (dead tiles after
             the live ones)
  per-token  the same 256 tokens in arrival order: adapters at random, one token a tile (nothing grouped:
             each token re-reads its adapter's rows, as the old gather form did for every batch)
  prefill    4,096 tokens, one run per adapter, 64-token tiles
Implementations (columns):
  triton       kernels.lora_shrink + lora_expand: one launch each for all slices of a layer
  reference    kernels.lora_shrink_ref + lora_expand_ref: a Python loop over runs and slices
  per-adapter  what a plain PyTorch server does: for each adapter in the batch, index its tokens, then
               x @ A.T @ B * scale with that adapter's dense matrices and add into y
GB/s counts the bytes one call must move: x, the A and B rows of each distinct adapter once, the split-K
partials written and read back, y read and written; `of copy` is triton's GB/s over a large device copy's.
Ranks are mixed 8..64 per adapter; weights are random bf16.
CUDA only:  python -m bench.bench_kernels [--quick]
"""
import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch

from engine.lora import DECODE_TILE, PREFILL_TILE, lora_tiles, max_decode_tiles
from kernels import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref, lora_split_k

MODULES = {"qkv": (4096, (4096, 4096, 4096)), "gate_up": (4096, (11008, 11008)), "down": (11008, (4096,))}
RANKS = (8, 16, 32, 64)
ADAPTER_COUNTS = (1, 8, 16, 64, 512)
FORMS = {"decode": (256, DECODE_TILE), "per-token": (256, DECODE_TILE), "prefill": (4096, PREFILL_TILE)}
DTYPE = torch.bfloat16


@dataclass
class LoraBatch:
    x: torch.Tensor
    pool: torch.Tensor
    a_rows: torch.Tensor
    b_rows: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    tiles: torch.Tensor
    tile_size: int
    xa: torch.Tensor                           # split-K scratch, as the engine's LoraWorkspace hands out
    slice_offsets: tuple[int, ...]
    groups: list[tuple[int, torch.Tensor]]     # (slot, its token indices) for the per-adapter loop
    dense: dict                                # (slice, slot) -> (A^T [r, d_in], B [r, d_out]) views of the pool
    bytes_moved: int


def token_slots(form: str, n_adapters: int, n_tokens: int, gen: torch.Generator) -> np.ndarray:
    if form == "prefill":                      # one equal run per adapter (up to one token each)
        n_runs = min(n_adapters, n_tokens)
        return np.repeat(np.arange(n_runs), [n_tokens // n_runs + (g < n_tokens % n_runs) for g in range(n_runs)])
    slots = torch.randint(0, n_adapters, (n_tokens,), generator=gen).numpy()
    return np.sort(slots) if form == "decode" else slots


def make_batch(d_in: int, d_outs: tuple[int, ...], n_adapters: int, form: str, device: str,
               dtype: torch.dtype, gen: torch.Generator) -> LoraBatch:
    """Adapters laid out row by row in one flat pool, as the engine's page pool holds them."""
    n_tokens, tile_size = FORMS[form]
    n_slices, max_rank = len(d_outs), max(RANKS)
    adapter_ranks = [RANKS[int(i)] for i in torch.randint(0, len(RANKS), (n_adapters,), generator=gen)]
    a_rows = torch.zeros(n_slices, n_adapters, max_rank, dtype=torch.int64)
    b_rows = torch.zeros_like(a_rows)
    dense_spans, offset = {}, 0
    for slot, r in enumerate(adapter_ranks):
        for s, d_out in enumerate(d_outs):
            a_rows[s, slot, :r] = offset + torch.arange(r) * d_in
            b_rows[s, slot, :r] = offset + r * d_in + torch.arange(r) * d_out
            dense_spans[s, slot] = (offset, r, d_out)
            offset += r * (d_in + d_out)
    pool = (torch.randn(offset, generator=gen) * 0.02).to(device, dtype)
    dense = {key: (pool[o:o + r * d_in].view(r, d_in), pool[o + r * d_in:o + r * (d_in + d_out)].view(r, d_out))
             for key, (o, r, d_out) in dense_spans.items()}

    slots = token_slots(form, n_adapters, n_tokens, gen)
    tiles = lora_tiles(slots, tile_size)
    if form == "decode":                       # a graph's table: sized for the worst case, dead tiles last
        dead = max_decode_tiles(n_tokens, len(np.unique(slots))) - tiles.shape[0]
        tiles = np.concatenate([tiles, np.tile([[-1, 0, 0]], (dead, 1)).astype(np.int32)])
    split_k = lora_split_k(tiles.shape[0], n_slices, max_rank, d_in, tile_size)
    groups = [(int(a), torch.from_numpy(np.flatnonzero(slots == a)).to(device)) for a in np.unique(slots)]
    distinct_rows = sum(adapter_ranks[a] for a, _ in groups)
    item = torch.tensor([], dtype=dtype).element_size()
    bytes_moved = (n_tokens * d_in * item + distinct_rows * (n_slices * d_in + sum(d_outs)) * item
                   + 2 * split_k * n_slices * n_tokens * max_rank * 4 + 2 * n_tokens * sum(d_outs) * item)
    ranks = torch.tensor(adapter_ranks, dtype=torch.int32).expand(n_slices, -1).contiguous()
    return LoraBatch(x=torch.randn(n_tokens, d_in, generator=gen).to(device, dtype), pool=pool,
                     a_rows=a_rows.to(device), b_rows=b_rows.to(device), ranks=ranks.to(device),
                     scales=torch.full((n_slices, n_adapters), 0.5, device=device),
                     tiles=torch.from_numpy(tiles).to(device), tile_size=tile_size,
                     xa=torch.empty(split_k, n_slices, n_tokens, max_rank, device=device),
                     slice_offsets=tuple(torch.tensor((0,) + d_outs).cumsum(0).tolist()), groups=groups,
                     dense=dense, bytes_moved=bytes_moved)


def kernel_step(shrink, expand):
    def step(b: LoraBatch, y: torch.Tensor) -> None:
        shrink(b.x, b.pool, b.a_rows, b.ranks, b.tiles, b.tile_size, b.xa)
        expand(y, b.xa, b.pool, b.b_rows, b.ranks, b.scales, b.tiles, b.tile_size, b.slice_offsets)
    return step


def per_adapter_step(b: LoraBatch, y: torch.Tensor) -> None:
    for slot, tokens in b.groups:
        x = b.x[tokens]
        for s, (lo, hi) in enumerate(zip(b.slice_offsets[:-1], b.slice_offsets[1:])):
            a, bm = b.dense[s, slot]
            y[tokens, lo:hi] += (x @ a.T) @ bm * b.scales[s, slot].to(y.dtype)


IMPLS = {"triton": kernel_step(lora_shrink, lora_expand), "reference": kernel_step(lora_shrink_ref, lora_expand_ref),
         "per-adapter": per_adapter_step}


def time_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write): the roofline the kernels are held against."""
    src = torch.empty(1 << 29, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / (time_ms(lambda: dst.copy_(src)) / 1e3)


def check(b: LoraBatch, n_cols: int) -> None:
    """Triton and the reference add the same delta (bf16 tolerances)."""
    y_triton, y_ref = (torch.zeros(b.x.shape[0], n_cols, dtype=b.x.dtype, device=b.x.device) for _ in range(2))
    IMPLS["triton"](b, y_triton)
    IMPLS["reference"](b, y_ref)
    torch.testing.assert_close(y_triton, y_ref, atol=5e-2, rtol=5e-2)


def run_case(form: str, module: str, n_adapters: int, device: str, gen: torch.Generator) -> dict:
    d_in, d_outs = MODULES[module]
    b = make_batch(d_in, d_outs, n_adapters, form, device, DTYPE, gen)
    check(b, sum(d_outs))
    y = torch.zeros(b.x.shape[0], sum(d_outs), dtype=b.x.dtype, device=device)
    row = dict(form=form, module=module, adapters=n_adapters, tokens=b.x.shape[0], distinct=len(b.groups),
               tiles=int((b.tiles[:, 0] >= 0).sum()), split_k=b.xa.shape[0], mb=b.bytes_moved / 1e6)
    for name, step in IMPLS.items():
        ms = time_ms(lambda: step(b, y))
        row[name] = (ms, b.bytes_moved / ms / 1e6)
    return row


def print_table(rows: list[dict], copy_gbs: float) -> None:
    head = (f"{'form':9} {'module':8} {'adapters':>8} {'tokens':>6} {'distinct':>8} {'tiles':>5} {'split':>5} "
            f"{'MB':>8} " + " ".join(f"{name + ' ms':>15} {'GB/s':>7}" for name in IMPLS)
            + f" {'of copy':>7} {'x ref':>7} {'x loop':>7}")
    print(head)
    for r in rows:
        cells = " ".join(f"{r[name][0]:15.3f} {r[name][1]:7.0f}" for name in IMPLS)
        print(f"{r['form']:9} {r['module']:8} {r['adapters']:8d} {r['tokens']:6d} {r['distinct']:8d} {r['tiles']:5d} "
              f"{r['split_k']:5d} {r['mb']:8.1f} {cells} {r['triton'][1] / copy_gbs:7.0%} "
              f"{r['reference'][0] / r['triton'][0]:7.1f} {r['per-adapter'][0] / r['triton'][0]:7.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="qkv only, 1 and 64 adapters")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels times the Triton kernels on a CUDA GPU, and this machine has none. "
                 "The kernels' correctness on CPU is checked by `pytest tests/kernels` (Triton interpreter).")
    gen = torch.Generator().manual_seed(args.seed)
    modules = ["qkv"] if args.quick else list(MODULES)
    counts = (1, 64) if args.quick else ADAPTER_COUNTS
    copy_gbs = copy_bandwidth("cuda") / 1e9
    print(f"{torch.cuda.get_device_name()}, bf16, ranks {RANKS} mixed; device copy {copy_gbs:,.0f} GB/s")
    rows = [run_case(form, module, n, "cuda", gen) for form in FORMS for module in modules for n in counts]
    print_table(rows, copy_gbs)


if __name__ == "__main__":
    main()
