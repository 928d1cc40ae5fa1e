"""A decode step against its roofline: measured step, roofline, ratio, the engine's own host time, and where the
device time goes, on a Llama-2-7B-shaped model with random bf16 weights and CUDA graphs.

  python -m bench.bench_step            # GPU (H200: a few minutes): base, 1 and 16 adapters at batch 64 and 256
  python -m bench.bench_step --tiny     # CPU, tiny float32 model: runs every code path; its numbers mean nothing
  python -m bench.bench_step --stub     # CPU: the engine's own work per decode step (model stubbed) and the sampler

step: wall time per decode step on a GPU, CPU time on CPU (every row of a case has the same prompt, so the
batch stays full; context ~280 on the GPU). roofline: weight + KV + adapter bytes the step must read, over the bandwidth of a large
device copy measured in the same run (bench/roofline.py). host: the same steps with the model stubbed
(bench/stub_model.py): scheduling, inputs, graph buffers, sampling, bookkeeping. The `sampled` case draws
every row with temperature 0.8 and top-p 0.9 (compared with the greedy case of its batch). Profile: the
kernels of eager decode steps (torch.profiler) in five groups. Sampler: engine.sampling.sample_tokens alone.
"""
import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.bench_e2e import release
from bench.kernel_groups import GROUPS, profile_steps
from bench.roofline import DecodeRoofline, measure_bandwidth, synchronize
from bench.stub_model import STUB_CONFIG, StubModel
from bench.workload import LLAMA2_7B, TINY, random_model, write_adapters, write_model_dir
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import load_model_args
from engine.request import Request, SamplingParams
from engine.sampling import SamplingBatch, sample_tokens

SAMPLED = dict(temperature=0.8, top_p=0.9)
HOST_BATCH, HOST_VOCAB = 256, 512           # the CPU targets: <= 0.3 ms greedy, <= 3 ms sampled per decode step
SAMPLER_REPEATS = {512: 20, 32000: 3}      # vocabulary -> timed calls of sample_tokens alone
BLOCK_SIZE = EngineConfig.block_size


@dataclass(frozen=True)
class Scale:
    model: dict
    dtype: str
    device: str
    batches: tuple[int, ...]
    adapter_counts: tuple[int, ...]
    prompt_len: int
    warmup_steps: int
    measured_steps: int
    profiled_steps: int
    bandwidth_probe_bytes: int
    engine: dict = field(default_factory=dict)


SCALES = {
    "gpu": Scale(LLAMA2_7B, "bfloat16", "cuda", (64, 256), (0, 1, 16), 270, 3, 10, 3, 2 << 30,
                 dict(max_num_seqs=256, max_num_batched_tokens=16384, max_active_adapters=16,
                      max_resident_adapters=32, max_lora_rank=64)),
    "tiny": Scale(TINY, "float32", "cpu", (4, 16), (0, 1, 16), 12, 1, 3, 1, 16 << 20,
                  dict(max_num_seqs=16, max_active_adapters=16, max_resident_adapters=16, max_lora_rank=64,
                       cpu_pool_bytes=64 << 20)),
}
# The CPU host targets: batch 256 at the GPU cases' context, model stubbed.
HOST_SCALE = Scale(STUB_CONFIG, "float32", "cpu", (HOST_BATCH,), (0, 16), 270, 3, 20, 0, 0)
HOST_CASES = [(0, HOST_BATCH, False), (16, HOST_BATCH, False), (0, HOST_BATCH, True)]


def make_requests(tag: str, batch: int, adapter_ids: list[str], prompt_len: int, new_tokens: int, vocab: int,
                  sampled: bool) -> list[Request]:
    """`batch` rows with prompts of one length, adapters round-robin (none: the base model)."""
    rng = random.Random(tag)
    sampling = dict(max_new_tokens=new_tokens, **(SAMPLED if sampled else {}))
    return [Request(f"{tag}-{i}", adapter_ids[i % len(adapter_ids)] if adapter_ids else None,
                    prompt_token_ids=[rng.randrange(1, vocab) for _ in range(prompt_len)],
                    sampling=SamplingParams(**sampling)) for i in range(batch)]


def start(engine: Engine, requests: list[Request], warmup: int) -> None:
    """Queue the requests, then step through their prefill and `warmup` decode steps."""
    assert all(engine.add_request(r) is None for r in requests)
    target = engine.stats.decode_steps + warmup
    while engine.stats.decode_steps < target:
        engine.step()


def clock(device: str):
    """Wall time on a GPU; on CPU this process's CPU time, so other processes on a shared CPU do not count
    (everything a CPU step does is this process's work)."""
    return time.process_time if device == "cpu" else time.perf_counter


def time_decode_steps(engine: Engine, n: int, roof: DecodeRoofline | None) -> tuple[float, float]:
    """(median seconds of a decode step, mean roofline seconds of one) over the next n steps, then run to the
    end. Steps are not synchronized one by one (a loop that overlaps the host with the device keeps doing
    so), only the last."""
    sched, roofline, decode_steps, ends = engine.scheduler, 0.0, engine.stats.decode_steps, []
    now = clock(engine.config.device)
    ends.append(now())
    for i in range(n):
        if roof is not None:
            batch = sched.running
            roofline += roof.seconds(sum(s.num_tokens for s in batch), [s.adapter_id for s in batch])
        engine.step()
        if i == n - 1:
            synchronize(engine.config.device)
        ends.append(now())
    assert engine.stats.decode_steps == decode_steps + n, "a measured step was not a decode step"
    while not engine.is_finished():
        engine.step()
    return statistics.median(b - a for a, b in zip(ends, ends[1:])), roofline / n


def case_name(n_adapters: int, batch: int, sampled: bool) -> str:
    return f"{'base' if not n_adapters else f'N{n_adapters}'}{' sampled' if sampled else ''} @{batch}"


def new_tokens(scale: Scale) -> int:
    return scale.warmup_steps + scale.measured_steps + 2                  # the prefill gives the first token


def run_cases(engine: Engine, cases, adapter_ids, scale: Scale, vocab: int, roof=None) -> dict[str, tuple]:
    """case name -> (seconds per decode step, roofline seconds per step)."""
    results = {}
    for n_adapters, batch, sampled in cases:
        name = case_name(n_adapters, batch, sampled)
        start(engine, make_requests(name, batch, adapter_ids[:n_adapters], scale.prompt_len, new_tokens(scale),
                                    vocab, sampled), scale.warmup_steps)
        results[name] = time_decode_steps(engine, scale.measured_steps, roof)
    return results


def on_engine(config: EngineConfig, model, work):
    """work(engine) on a fresh engine, closed after; nothing else holds it, so its page pool goes with it."""
    engine = Engine(config, model)
    try:
        return work(engine)
    finally:
        engine.close()


def profile_cases(engine: Engine, cases, adapter_ids, scale: Scale, vocab: int) -> dict[str, dict]:
    """Kernel time per group per eager decode step, for each case."""
    profiles = {}
    for n_adapters, batch, sampled in cases:
        name = case_name(n_adapters, batch, sampled)
        start(engine, make_requests(f"profile {name}", batch, adapter_ids[:n_adapters], scale.prompt_len,
                                    new_tokens(scale), vocab, sampled), scale.warmup_steps)
        profiles[name] = profile_steps(engine.step, scale.profiled_steps, engine.config.device)
        while not engine.is_finished():
            engine.step()
    return profiles


@contextlib.contextmanager
def one_cpu_thread(device: str):
    """CPU timings on one intra-op thread: the engine's host side is one thread, and on a shared CPU a second
    one mostly waits for a core (a [256, 512] op then takes milliseconds instead of microseconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if device == "cpu" else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def stub_host_ms(root: Path, device: str, vocab: int, cases, scale: Scale) -> dict[str, float]:
    """ms of a decode step with the model stubbed (the engine's own work), per case; adapters have the
    stub's shapes."""
    model_dir = write_model_dir(root / f"stub-{vocab}", dict(STUB_CONFIG, vocab_size=vocab,
                                                             max_position_embeddings=4096))
    args = load_model_args(str(model_dir))
    adapter_ids = list(write_adapters(root / f"stub-adapters-{vocab}", root / f"stub-lora-{vocab}",
                                      max(n for n, _, _ in cases), args, torch.float32, device))
    batch = max(b for _, b, _ in cases)
    kv_pages = batch * -(-(scale.prompt_len + new_tokens(scale)) // BLOCK_SIZE)
    config = EngineConfig(model=str(model_dir), adapters=str(root / f"stub-adapters-{vocab}"), device=device,
                          max_num_seqs=batch, max_num_batched_tokens=batch * scale.prompt_len, block_size=BLOCK_SIZE,
                          max_active_adapters=16, max_resident_adapters=16, num_pages=kv_pages + 1024)
    with one_cpu_thread(device):
        timed = on_engine(config, StubModel(vocab, 4096, batch, device),
                          lambda engine: run_cases(engine, cases, adapter_ids, scale, vocab))
    return {name: 1e3 * seconds for name, (seconds, _) in timed.items()}


def sampler_ms(device: str, batch: int = HOST_BATCH) -> dict[int, float]:
    """Median ms of sample_tokens on `batch` rows with temperature + top-p on every row, per vocabulary size."""
    results = {}
    for vocab, repeats in SAMPLER_REPEATS.items():
        logits = torch.randn(batch, vocab, device=device) * 3
        full = lambda value, dtype: torch.full((batch,), value, dtype=dtype, device=device)  # noqa: E731
        params = SamplingBatch(full(SAMPLED["temperature"], torch.float32), full(0, torch.int64),
                               full(SAMPLED["top_p"], torch.float32), torch.arange(batch, device=device),
                               full(300, torch.int64), truncates=True)
        times, now = [], clock(device)
        with one_cpu_thread(device):
            for _ in range(repeats + 1):                                  # the first one warms up
                started = now()
                sample_tokens(logits, params)
                synchronize(device)
                times.append(now() - started)
        results[vocab] = 1e3 * statistics.median(times[1:])
    return results


def model_cases(scale: Scale, root: Path, seed: int) -> tuple[list[dict], dict, dict]:
    """Every case on the model: timed with graphs (where the device has them), profiled eagerly."""
    model_dir = write_model_dir(root / "model", scale.model)
    args = load_model_args(str(model_dir))
    config = dict(model=str(model_dir), adapters=str(root / "adapters"), device=scale.device, dtype=scale.dtype,
                  **scale.engine)
    model = random_model(args, EngineConfig(**config).torch_dtype, scale.device, seed)
    ranks = write_adapters(root / "adapters", root / "lora", max(scale.adapter_counts), args,
                           EngineConfig(**config).torch_dtype, scale.device, seed)
    adapter_ids = list(ranks)
    bandwidth = measure_bandwidth(scale.device, scale.bandwidth_probe_bytes)
    roof = DecodeRoofline.of(model, ranks, bandwidth)
    cases = [(n, b, False) for n in scale.adapter_counts for b in scale.batches] + \
            [(0, max(scale.batches), True)]

    def warm_up_then_time(engine: Engine) -> dict[str, tuple]:
        warmup = [(max(scale.adapter_counts), min(scale.batches), False)]
        run_cases(engine, warmup, adapter_ids, scale, args.vocab_size)    # compiles every kernel before timing
        return run_cases(engine, cases, adapter_ids, scale, args.vocab_size, roof)
    timed = on_engine(EngineConfig(**config), model, warm_up_then_time)
    release(model, scale.device)
    profiled = [(0, max(scale.batches), False), (max(scale.adapter_counts), max(scale.batches), False)]
    profiles = on_engine(EngineConfig(**dict(config, cuda_graphs=False)), model,
                         lambda engine: profile_cases(engine, profiled, adapter_ids, scale, args.vocab_size))
    release(model, scale.device)
    host = stub_host_ms(root, scale.device, args.vocab_size, cases, scale)
    rows = []
    for n, b, sampled in cases:
        name = case_name(n, b, sampled)
        step_s, roof_s = timed[name]
        rows.append(dict(case=name, adapters=n, batch=b, sampled=sampled, step_ms=1e3 * step_s,
                         roofline_ms=1e3 * roof_s, x_roofline=step_s / roof_s, host_ms=host[name]))
    greedy = next(r for r in rows if (r["adapters"], r["batch"], r["sampled"]) == (0, max(scale.batches), False))
    rows[-1]["x_greedy"] = rows[-1]["step_ms"] / greedy["step_ms"]
    return rows, profiles, dict(bandwidth_bytes_per_s=bandwidth, weight_bytes=roof.weight_bytes,
                                kv_bytes_per_token=roof.kv_bytes_per_token, adapter_ranks=ranks)


def print_report(rows: list[dict], profiles: dict, host: dict, sampler: dict, meta: dict) -> None:
    print(f"\n{meta['model']} {meta['dtype']} on {meta['device_name']} ({meta['date']})")
    if rows:
        print(f"{'case':18} {'step ms':>8} {'roofline ms':>11} {'x roofline':>10} {'host ms':>8}")
        for r in rows:
            extra = f"   {r['x_greedy']:.2f}x the greedy step" if "x_greedy" in r else ""
            print(f"{r['case']:18} {r['step_ms']:8.2f} {r['roofline_ms']:11.2f} {r['x_roofline']:10.2f} "
                  f"{r['host_ms']:8.2f}{extra}")
        print(f"\nkernel time per eager decode step, ms ({'device' if meta['device'] == 'cuda' else 'CPU op'} time)")
        print(f"{'case':18} " + " ".join(f"{g:>11}" for g in GROUPS + ("total",)))
        for name, groups in profiles.items():
            print(f"{name:18} " + " ".join(f"{groups[g]:11.2f}" for g in GROUPS + ("total",)))
    print(f"\nhost work per decode step (CPU time, one thread), model stubbed, batch {HOST_BATCH}, vocabulary "
          f"{HOST_VOCAB} (targets: greedy <= 0.3 ms, sampled <= 3 ms)")
    for name, ms in host.items():
        print(f"  {name:18} {ms:8.3f} ms")
    print(f"sample_tokens alone, {HOST_BATCH} rows, temperature + top-p on every row ({meta['device_name']})")
    for vocab, ms in sampler.items():
        print(f"  vocabulary {vocab:>6}   {ms:8.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny float32 model on CPU: exercises every code path")
    mode.add_argument("--stub", action="store_true", help="only the host work (model stubbed) and the sampler, CPU")
    parser.add_argument("--out", default="bench/results", help="folder for bench_step.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scale = SCALES["tiny" if args.tiny or args.stub else "gpu"]
    if scale.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_step needs a CUDA GPU (--tiny runs a tiny model on CPU, --stub only the host side)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lorafleet-step-") as tmp:
        rows, profiles, setup = ([], {}, {}) if args.stub else model_cases(scale, Path(tmp), args.seed)
        host = stub_host_ms(Path(tmp), "cpu", HOST_VOCAB, HOST_CASES, HOST_SCALE)
    host = {("sampled" if s else "greedy") + (f", {n} adapters" if n else ""): host[case_name(n, b, s)]
            for n, b, s in HOST_CASES}
    sampler = sampler_ms(scale.device)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device=scale.device,
                device_name=torch.cuda.get_device_name() if scale.device == "cuda" else "CPU",
                model="Llama-2-7B shapes" if scale.model is LLAMA2_7B else "tiny Llama", dtype=scale.dtype,
                mode="stub" if args.stub else "tiny" if args.tiny else "gpu",
                torch=torch.__version__, wall_s=time.perf_counter() - started, **setup)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_step.json").write_text(json.dumps(dict(meta=meta, cases=rows, profiles=profiles, host=host,
                                                         sampler={str(v): ms for v, ms in sampler.items()}),
                                                    indent=1))
    print_report(rows, profiles, host, sampler, meta)


if __name__ == "__main__":
    main()
