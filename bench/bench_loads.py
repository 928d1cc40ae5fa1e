"""Host-side adapter loads on CPU: read + check + pack GB/s for Llama-2-7B-shaped adapters of ranks 8-64,
against a plain safetensors.torch.load_file of the same file, with 1 and 2 reader threads.

  python -m bench.bench_loads [--repeats 7] [--out bench/results]   # 7B shapes, ~2 GB of temp files
  python -m bench.bench_loads --tiny                                # tiny shapes: checks the code paths

load_file maps the file and reads nothing until a tensor is touched, so it is shown twice: as it is, and with
each tensor cloned into memory (what owning the bytes, to pin or cast them, costs at least).
"host work" is what a reader thread does before the device takes over: read the file once (sha256 while
reading), check its header and config, scan it for NaN/Inf, lay out its rows (engine.adapters.read_adapter +
engine.adapter_memory.pack_adapter). "CPU scatter" is the device's part done on the CPU (the torch reference
of kernels/adapter_rows.py into a CPU page pool): on a GPU that is one kernel after one copy over PCIe.
Files are read from the page cache (written just before): storage speed is not measured. Every figure is the
median of --repeats runs, with the spread (min-max) beside it: on a shared machine, run it when it is quiet.
"""
import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.workload import LLAMA2_7B, TINY, random_lora, write_adapter
from engine.adapter_file import HostBuffers
from engine.adapter_memory import ResidentAdapters, pack_adapter
from engine.adapters import read_adapter
from engine.config import EngineConfig
from engine.model import ModelArgs
from engine.model_runner import pool_geometry
from engine.page_pool import PagePool

DTYPE = torch.bfloat16


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median, min, max) seconds of fn() over repeats runs, after one unmeasured run."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times), max(times)


class Loader:
    """Reads, checks and packs one adapter as the engine's reader threads do, and scatters it into a CPU pool."""

    def __init__(self, args: ModelArgs, root: Path):
        self.args, self.root = args, root
        self.buffers = HostBuffers(keep_bytes=4 << 30)   # as the engine's store reuses them
        block_size, self.page_numel, _ = pool_geometry(EngineConfig(model="-", dtype="bfloat16"), args)
        self.pool = PagePool(0, args.num_layers, block_size, args.num_kv_heads, args.head_dim, DTYPE, "cpu")

    def host_work(self, adapter_id: str):
        file = read_adapter(str(self.root), adapter_id, self.args, DTYPE, max_rank=64, buffers=self.buffers)
        return pack_adapter(file, self.args, self.page_numel, 64)

    def scatter(self, packed) -> None:
        if self.pool.num_pages < packed.num_pages:   # a pool just big enough, made once per rank
            self.pool = PagePool(packed.num_pages, self.args.num_layers, self.pool.block_size,
                                 self.args.num_kv_heads, self.args.head_dim, DTYPE, "cpu")
        resident = ResidentAdapters(self.args, self.pool, 1, 64, "cpu")
        resident.load(packed)
        resident.unload(packed.adapter_id)


def measure(args: ModelArgs, ranks: list[int], repeats: int, readers: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lorafleet-loads-") as tmp:
        root = Path(tmp)
        loader = Loader(args, root)
        for rank in ranks:
            weights = root / f"rank{rank}.safetensors"
            save_file(random_lora(args, rank, DTYPE, "cpu", seed=rank), str(weights))
            ids = [f"r{rank}-{i}" for i in range(2 * readers)]
            for adapter_id in ids:
                write_adapter(root / adapter_id, weights, rank)
            size = weights.stat().st_size
            plain = timed(lambda: load_file(weights), repeats)
            cloned = timed(lambda: {k: v.clone() for k, v in load_file(weights).items()}, repeats)
            host = timed(lambda: loader.host_work(ids[0]), repeats)
            packed = loader.host_work(ids[0])
            scatter = timed(lambda: loader.scatter(packed), repeats)
            one = timed(lambda: [loader.host_work(a) for a in ids], repeats)
            with ThreadPoolExecutor(readers) as pool:
                many = timed(lambda: list(pool.map(loader.host_work, ids)), repeats)
            rows.append(dict(rank=rank, bytes=size, load_file_s=plain, load_file_clone_s=cloned, host_s=host,
                             scatter_s=scatter,
                             one_reader_s=one, readers=readers, n_readers_s=many,
                             reader_speedup=one[0] / many[0]))
            print(format_row(rows[-1]), flush=True)
            weights.unlink()
    return rows


def spread(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"


HEADER = (f"{'rank':>4} {'MiB':>6}  {'load_file s':>22} {'load_file+clone s':>22} {'host work s':>22} {'GB/s':>5} "
          f"{'x clone':>7}  {'CPU scatter s':>22}  {'readers x':>9}")


def format_row(row: dict) -> str:
    gb = row["bytes"] / 1e9
    return (f"{row['rank']:>4} {row['bytes'] / 2**20:>6.0f}  {spread(row['load_file_s']):>22} "
            f"{spread(row['load_file_clone_s']):>22} {spread(row['host_s']):>22} {gb / row['host_s'][0]:>5.2f} "
            f"{row['load_file_clone_s'][0] / row['host_s'][0]:>7.2f}  {spread(row['scatter_s']):>22}  "
            f"{row['reader_speedup']:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: exercises the code paths in seconds")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--readers", type=int, default=2, help="reader threads compared with one")
    parser.add_argument("--out", type=Path, help="folder for bench_loads.json")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    args = ModelArgs.from_hf_config(TINY if opts.tiny else LLAMA2_7B)
    print(f"{'tiny' if opts.tiny else 'Llama-2-7B'}-shaped bf16 adapters on all seven projections; median "
          f"(min-max) of {opts.repeats}; 'readers x' = {opts.readers} reader threads' rate over one's")
    print(HEADER, flush=True)
    rows = measure(args, opts.ranks, opts.repeats, opts.readers)
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "bench_loads.json").write_text(json.dumps(dict(
            date=time.strftime("%Y-%m-%d %H:%M %Z"), shapes="tiny" if opts.tiny else "Llama-2-7B", rows=rows),
            indent=1))


if __name__ == "__main__":
    main()
