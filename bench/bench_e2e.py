"""End-to-end throughput on a workload shaped like a night of evaluations: lorafleet against the base model,
Hugging Face PEFT and the decode roofline, all measured in one process on one GPU, on a Llama-2-7B-shaped
model with random bf16 weights.

  python -m bench.bench_e2e [--quick] [--out bench/results]   # H200: < 10 min (--quick: < 2 min)
  python -m bench.bench_e2e --tiny                            # CPU, tiny model: checks every code path

Cases: lorafleet with N adapters in the planner's order and in arrival order; lorafleet with no
adapters (the ceiling); PEFT mixed batches (`adapter_names=`) and PEFT one adapter at a time on a
bounded slice; the roofline of the base case's decode steps. Every lorafleet case runs the same requests
(the same token counts) to the end: the request count is what scales a run to its time, and is printed.
Writes bench_e2e.json and bench_e2e.png.
"""
import argparse
import gc
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.peft_baseline import build_hf_model, load_peft, run_peft_mixed, run_peft_single
from bench.roofline import DecodeRoofline, DecodeTiming, measure_bandwidth
from bench.workload import LLAMA2_7B, TINY, Workload, make_workload, random_model, write_adapters, write_model_dir
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import load_model_args
from engine.model import Transformer
from pipeline.run import build_plan

# At N = 2,048 each adapter has ~10 requests: a batch of 256 needs ~26 adapters active at once.
GPU_ENGINE = dict(max_num_seqs=256, max_num_batched_tokens=8192, max_active_adapters=32, max_resident_adapters=96,
                  max_lora_rank=64, host_cache_bytes=16 << 30)


@dataclass(frozen=True)
class Scale:
    model: dict
    dtype: str
    adapter_counts: tuple[int, ...]       # N of each planned-order case
    arrival_counts: tuple[int, ...]       # N of the arrival-order cases
    requests: int                         # per case: 80% split evenly over the N adapters, 20% by popularity
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    peft_batch: int
    peft_steps: int                       # new tokens per PEFT request
    bandwidth_probe_bytes: int
    engine: dict = field(default_factory=dict)


# Sized from bytes and FLOPs on an H200 (Llama-2-7B shapes: 13.4 GFLOP a token, ~790 TFLOP/s; decode at batch
# 64-256 ~10-25 ms a step): 20,480 requests of ~32 prompt and ~16 output tokens are ~9e15 FLOP of prefill
# (~20 s) and ~1,300 decode steps (13-33 s) a case; at N = 2,048 each adapter has its 8 + ~2 requests and
# ~300 GB of adapter files go through the readers (2,048 loads of ~150 MB). Full: 8 cases, ~6-9 min with set-up
# and PEFT. Quick: 5,120 requests (N = 512: 8 each), 4 cases, ~1.5 min.
SCALES = {
    "full": Scale(LLAMA2_7B, "bfloat16", (1, 8, 64, 512, 2048), (512, 2048), 20_480, (8, 56), (4, 28), 32, 8,
                  2 << 30, GPU_ENGINE),
    "quick": Scale(LLAMA2_7B, "bfloat16", (8, 512), (512,), 5_120, (8, 56), (4, 28), 8, 4, 1 << 30, GPU_ENGINE),
    "tiny": Scale(TINY, "float32", (1, 12), (12,), 48, (4, 16), (2, 6), 4, 3, 16 << 20,
                  dict(max_num_seqs=4, max_active_adapters=2, max_resident_adapters=2, max_lora_rank=64)),
}
WARMUP_REQUESTS, WARMUP_TOKENS = 16, 4


def release(model: Transformer, device: str) -> None:
    """Drop the last engine's page pool (the model's attention layers still point into it)."""
    for layer in model.layers:
        layer.self_attn.k_cache = layer.self_attn.v_cache = None
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def run_lorafleet(name: str, config: EngineConfig, model: Transformer, workload: Workload, order: str,
                  roof: DecodeRoofline) -> dict:
    """One engine over the whole workload in `order` ("planned" or "arrival"), timing every step."""
    release(model, config.device)
    engine = Engine(config, model)   # weights already on the device
    try:
        requests, plan_s = workload.requests, 0.0
        if order == "planned":
            started = time.perf_counter()
            pool = engine.runner.pool
            plan = build_plan(config, engine.runner.args, (pool.block_size, pool.page_numel, pool.num_pages),
                              requests, {r.request_id: len(r.prompt_token_ids) for r in requests})
            by_id = {r.request_id: r for r in requests}
            requests = [by_id[rid] for rid in plan.request_order()]
            plan_s = time.perf_counter() - started
        failed = sum(engine.add_request(r) is not None for r in requests)
        sched, stats = engine.scheduler, engine.stats
        timing, done = DecodeTiming(), 0
        started = time.perf_counter()
        while not engine.is_finished():
            batch = list(sched.running)   # what a decode step runs (unless it must preempt)
            decode_steps, step_start = stats.decode_steps, time.perf_counter()
            outputs = engine.step()
            step_s = time.perf_counter() - step_start
            if stats.decode_steps > decode_steps:
                timing.add(len(batch), step_s, roof.seconds(sum(s.num_tokens for s in batch),
                                                            [s.adapter_id for s in batch]))
            done += sum(o.finish_reason != "error" for o in outputs)
            failed += sum(o.finish_reason == "error" for o in outputs)
        wall = time.perf_counter() - started
    finally:
        engine.close()
    return dict(timing.summary(), case=name, order=order, n_adapters=len(workload.adapter_ranks),
                distinct_adapters=len({r.adapter_id for r in workload.requests if r.adapter_id is not None}),
                requests=len(workload.requests), requests_done=done, requests_failed=failed,
                prompt_tokens=stats.prompt_tokens, output_tokens=stats.output_tokens, wall_s=wall, plan_s=plan_s,
                output_tokens_per_s=stats.output_tokens / wall,
                total_tokens_per_s=(stats.prompt_tokens + stats.output_tokens) / wall,
                adapter_loads=stats.adapter_loads, adapter_bytes_loaded=stats.adapter_bytes_loaded,
                adapter_bytes_read=stats.adapter_bytes_read, adapter_read_s=stats.adapter_read_s,
                adapter_read_gb_per_s=stats.adapter_read_gb_per_s, adapter_load_wait_s=stats.adapter_load_wait_s,
                mean_adapters_per_decode_step=stats.mean_adapters_per_decode_step,
                preemptions=stats.preemptions, pool_pages=stats.pool_pages,
                peak_pool_pages_used=stats.peak_pool_pages_used, peak_gpu_bytes=peak_gpu_bytes(config.device))


def run_peers(model_dir: Path, adapter_root: Path, model: Transformer, workload: Workload, scale: Scale,
              device: str, roof: DecodeRoofline) -> list[dict]:
    """Both PEFT cases on the first peft_batch requests of the workload; consumes `model`."""
    dtype = model.lm_head.weight.dtype
    release(model, device)
    hf = build_hf_model(model_dir, model, dtype, device)
    model.to("meta")   # its weights are copied into hf; free them before PEFT needs room for its KV cache
    requests = random.Random(0).sample(workload.requests, scale.peft_batch)   # across adapters, not one block
    peft = load_peft(hf, adapter_root, list(dict.fromkeys(r.adapter_id for r in requests)), dtype, device)
    cases = []
    for run in (run_peft_mixed, run_peft_single):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        cases.append(dict(run(peft, requests, scale.peft_steps, device, roof), order="arrival",
                          peak_gpu_bytes=peak_gpu_bytes(device)))
    return cases


def add_ratios(cases: list[dict]) -> None:
    rate = {c["case"]: c["output_tokens_per_s"] for c in cases}
    for c in cases:
        c["vs_base"] = c["output_tokens_per_s"] / rate["lorafleet-base"]
        c["vs_peft_mixed"] = c["output_tokens_per_s"] / rate["peft-mixed"]


def roofline_case(base: dict) -> dict:
    """The base case's decode batches at the roofline: the most any decode step could deliver."""
    return dict(case="roofline", order="-", n_adapters=0, requests=base["requests"],
                output_tokens_per_s=base["roofline_output_tokens_per_s"],
                total_tokens_per_s=None, roofline_fraction=1.0, peak_gpu_bytes=None, adapter_loads=0,
                mean_adapters_per_decode_step=0.0, requests_done=base["requests_done"],
                decode_step_ms=base["roofline_step_ms"], mean_decode_batch=base["mean_decode_batch"])


COLUMNS = ["case", "N", "requests", "done", "out tok/s", "total tok/s", "x base", "x PEFT", "roofline", "peak GiB",
           "loads", "adapters/step", "load GB/s", "load wait s"]


def table_rows(cases: list[dict]) -> list[list[str]]:
    """One row of cells per case, under COLUMNS (the printed table and the README's share them)."""
    def num(v, spec):
        return "-" if v is None else format(v, spec)
    rows = []
    for c in cases:
        peak = c["peak_gpu_bytes"] / 2**30 if c["peak_gpu_bytes"] is not None else None
        rows.append([c["case"], str(c["n_adapters"]), f"{c['requests']:,}",
                     str(c["requests_done"]), num(c["output_tokens_per_s"], ",.1f"),
                     num(c["total_tokens_per_s"], ",.1f"), num(c["vs_base"], ".2f"), num(c["vs_peft_mixed"], ",.1f"),
                     num(c["roofline_fraction"], ".0%"), num(peak, ".1f"), str(c["adapter_loads"]),
                     f"{c['mean_adapters_per_decode_step']:.1f}", num(c.get("adapter_read_gb_per_s") or None, ".2f"),
                     num(c.get("adapter_load_wait_s"), ".2f")])
    return rows


def format_table(cases: list[dict]) -> str:
    rows = [COLUMNS] + table_rows(cases)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [" ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def write_chart(cases: list[dict], meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (rates, per_step) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    names = [c["case"] for c in cases]
    rates.barh(names, [c["output_tokens_per_s"] for c in cases], color="tab:blue")
    rates.set_xscale("log")
    rates.invert_yaxis()
    rates.set_xlabel("output tokens/s (log)")
    for order, marker in (("planned", "o-"), ("arrival", "s--")):
        points = sorted((c["n_adapters"], c["mean_adapters_per_decode_step"]) for c in cases
                        if c["case"].startswith("lorafleet-") and c["n_adapters"] and c["order"] == order)
        if points:
            per_step.plot(*zip(*points), marker, label=f"lorafleet, {order} order")
    per_step.set_xscale("log")
    per_step.set_xlabel("adapters in the workload (N)")
    per_step.set_ylabel("distinct adapters per decode step")
    per_step.legend()
    fig.suptitle(f"lorafleet end to end, {meta['model']} ({meta['dtype']}), {meta['device_name']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_all(scale: Scale, device: str, n_requests: int, bandwidth: float | None, seed: int) -> tuple[list[dict], dict]:
    """Build the model, adapters and workloads in a temporary folder and run every case; returns the
    cases and what the report says about the set-up."""
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        started = time.perf_counter()
        model_dir = write_model_dir(Path(tmp) / "model", scale.model)
        margs = load_model_args(str(model_dir))
        config = EngineConfig(model=str(model_dir), adapters=str(Path(tmp) / "adapters"), device=device,
                              dtype=scale.dtype, **scale.engine)
        model = random_model(margs, config.torch_dtype, device, seed)
        ranks = write_adapters(Path(config.adapters), Path(tmp) / "lora-weights", max(scale.adapter_counts), margs,
                               config.torch_dtype, device, seed)
        bandwidth = bandwidth or measure_bandwidth(device, scale.bandwidth_probe_bytes)
        roof = DecodeRoofline.of(model, ranks, bandwidth)
        workloads = {n: make_workload(n_requests, dict(list(ranks.items())[:n]), margs.vocab_size,
                                      scale.prompt_range, scale.output_range, seed=seed)
                     for n in scale.adapter_counts}
        largest = workloads[max(scale.adapter_counts)]
        print(f"set-up {time.perf_counter() - started:.1f}s: {len(ranks)} adapters, {n_requests:,} requests a case "
              f"({largest.output_tokens:,} output tokens), {bandwidth / 1e9:,.0f} GB/s", flush=True)

        warmup = make_workload(WARMUP_REQUESTS, dict(list(ranks.items())[:4]), margs.vocab_size,
                               scale.prompt_range, (WARMUP_TOKENS, WARMUP_TOKENS), seed=seed + 1)
        run_lorafleet("warm-up", config, model, warmup, "arrival", roof)   # compiles kernels before timing
        runs = [("lorafleet-base", workloads[scale.adapter_counts[0]].without_adapters(), "planned")]
        for n in scale.adapter_counts:
            runs.append((f"lorafleet-N{n}", workloads[n], "planned"))
            if n in scale.arrival_counts:
                runs.append((f"lorafleet-arrival-N{n}", workloads[n], "arrival"))
        cases = []
        for name, workload, order in runs:
            cases.append(run_lorafleet(name, config, model, workload, order, roof))
            c = cases[-1]
            print(f"{name}: {workload.describe()}: {c['output_tokens_per_s']:,.1f} output tokens/s, "
                  f"{c['adapter_loads']:,} loads, {c['adapter_read_gb_per_s']:.2f} GB/s read, "
                  f"{c['adapter_load_wait_s']:.2f} s waiting for loads", flush=True)
        cases += run_peers(model_dir, Path(config.adapters), model, largest, scale, device, roof)
    cases.append(roofline_case(cases[0]))
    add_ratios(cases)
    meta = dict(prompt_tokens_per_case=largest.prompt_tokens, output_tokens_per_case=largest.output_tokens,
                bandwidth_bytes_per_s=bandwidth, weight_bytes=roof.weight_bytes,
                kv_bytes_per_token=roof.kv_bytes_per_token,
                engine={k: getattr(config, k) for k in ("max_num_seqs", "max_num_batched_tokens",
                                                        "max_active_adapters", "max_resident_adapters")},
                wall_s=time.perf_counter() - started)
    return cases, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer cases and requests (< 2 min on an H200)")
    size.add_argument("--tiny", action="store_true", help="tiny float32 model on CPU: exercises every code path")
    parser.add_argument("--out", default="bench/results", help="folder for bench_e2e.json and bench_e2e.png")
    parser.add_argument("--requests", type=int, help="requests per lorafleet case (default: the scale's)")
    parser.add_argument("--bandwidth", type=float, help="memory bytes/s for the roofline (default: measured)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scale_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    scale = SCALES[scale_name]
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_e2e needs a CUDA GPU (use --tiny to run the tiny model on CPU)")
    n_requests = args.requests or scale.requests
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    cases, setup = run_all(scale, device, n_requests, args.bandwidth, args.seed)
    meta = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), scale=scale_name, device=device,
                device_name=torch.cuda.get_device_name() if device == "cuda" else "CPU", torch=torch.__version__,
                model="Llama-2-7B shapes" if scale.model is LLAMA2_7B else "tiny Llama", dtype=scale.dtype,
                requests_per_case=n_requests, prompt_range=scale.prompt_range,
                output_range=scale.output_range, peft_batch=scale.peft_batch, peft_new_tokens=scale.peft_steps,
                **setup)
    (out / "bench_e2e.json").write_text(json.dumps({"meta": meta, "cases": cases}, indent=1))
    write_chart(cases, meta, out / "bench_e2e.png")
    print(f"\n{meta['model']} {meta['dtype']} on {meta['device_name']}, {n_requests} requests a case "
          f"(output tokens/s include prefill; PEFT's are its decode steps alone)")
    print(format_table(cases))
    print(f"\nwrote {out / 'bench_e2e.json'} and {out / 'bench_e2e.png'} ({meta['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
