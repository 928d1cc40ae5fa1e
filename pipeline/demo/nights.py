"""A tiny fleet, three nights of evaluation, and a planted regression, in a minute or two on a CPU.

    python -m pipeline.demo [--root demo_data] [--size small|full]    # the nights through the pipeline calls
    python -m dagster_project.demo ...                                 # `make demo`: the nights through Dagster

1. Build a tiny Llama with a word-level tokenizer, pretrain it on copying (<root>/model).
2. LoRA-train one adapter per synthetic task with PEFT, each with its own rank and target modules
   (<root>/adapters/<adapter_id>/).
3. Write the same evaluation set as each night's request table (<root>/requests/date=D/): every adapter
   on its own task, and the base model (null adapter_id) on every task, each generated and as
   multiple-choice questions (the right answer among other tasks' answers, scored by log-likelihood).
4. Run each night: by default the pipeline's calls (pipeline.run.run_requests, then
   pipeline.evaluation.metrics.nightly_metrics, as Dagster's `generations` and `adapter_metrics` make them); `make demo`
   materializes the night's partition in Dagster instead (dagster_project.demo). Before the last night the
   `sort` adapter is republished from a short training run, as a deployment that ships a bad checkpoint
   would; the metrics must flag it.
5. Print the last night's table, the chart, and the command that opens the same data in Dagster.
"""
import argparse
import logging
import os
import random
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from peft import LoraConfig
from rich.console import Console

from engine.config import EngineConfig
from pipeline.demo.model import build_base_model, build_tokenizer, save_base_model, train, train_adapter
from pipeline.demo.tasks import EOS, choice_examples, examples
from pipeline.evaluation.metrics import nightly_metrics
from pipeline.evaluation.report import report
from pipeline.layout import nights_before_today, requests_url, results_url
from pipeline.run import run_requests
from pipeline.storage import join

SEED = 0
EVAL_SEED = 10_000                     # the evaluation prompts, apart from every training seed
MAX_NEW_TOKENS = 8                     # longest answer: 5 words and </s>, and room to ramble
CHOICE_LABELS = "ABCD"


@dataclass(frozen=True)
class DemoAdapter:
    adapter_id: str
    task: str
    lora: dict                         # LoraConfig kwargs
    lr: float = 1e-2


ADAPTERS = [
    DemoAdapter("reverse-r8", "reverse", dict(r=8, lora_alpha=16, target_modules="all-linear"), lr=5e-3),
    DemoAdapter("sort-r16-rslora", "sort", dict(r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear")),
    DemoAdapter("next-r4", "next", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                          "up_proj", "down_proj"])),
    DemoAdapter("upper-r8-mlp", "upper", dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj",
                                                                                   "down_proj"])),
    DemoAdapter("rotate-r2-attn", "rotate", dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"])),
]
SWAPPED = "sort-r16-rslora"            # republished, undertrained, before the last night
SWAPPED_STEPS = 15                     # the bad checkpoint's training run


@dataclass(frozen=True)
class DemoSize:
    pretrain_steps: int
    adapter_steps: int
    eval_per_adapter: int              # prompts per adapter per night
    eval_per_task_base: int            # prompts per task for the base model per night


SIZES = {
    "full": DemoSize(pretrain_steps=400, adapter_steps=300, eval_per_adapter=32, eval_per_task_base=8),
    "small": DemoSize(pretrain_steps=300, adapter_steps=200, eval_per_adapter=12, eval_per_task_base=4),
}


@dataclass
class DemoResult:
    root: str
    dates: list[str]
    metrics: pl.DataFrame              # the last night's metrics
    chart: str


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def one_torch_thread():
    """A model this small gains nothing from more threads, and OpenMP threads that share busy cores with
    other processes stall each other (we measured 30 steps/s falling to 0.3)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def request_table(date: str, size: DemoSize) -> pl.DataFrame:
    """The night's evaluation set: the same prompts every night, new request ids. Each task is asked twice:
    generated (scored against `reference`) and as 4-choice questions (scored rows, one per choice)."""
    rows = []
    for adapter in ADAPTERS:
        for owner, n in ((adapter.adapter_id, size.eval_per_adapter), (None, size.eval_per_task_base)):
            name = owner or f"base/{adapter.task}"
            for i, (prompt, reference) in enumerate(examples(adapter.task, n, seed=EVAL_SEED)):
                rows.append({"request_id": f"{date}/{name}/{i:03d}", "adapter_id": owner, "prompt": prompt,
                             "max_new_tokens": MAX_NEW_TOKENS, "reference": reference, "task": adapter.task})
            for i, (prompt, choices, gold) in enumerate(choice_examples(adapter.task, n, seed=EVAL_SEED)):
                rows += [{"request_id": f"{date}/{name}/mc{i:03d}/{label}", "adapter_id": owner, "prompt": prompt,
                          "continuation": f" {choice} {EOS}", "task": adapter.task,
                          "choice_group": f"{adapter.task}/{i:03d}", "choice_label": label, "gold": CHOICE_LABELS[gold]}
                         for label, choice in zip(CHOICE_LABELS, choices)]
    return pl.DataFrame(rows, schema={"request_id": pl.String, "adapter_id": pl.String, "prompt": pl.String,
                                      "max_new_tokens": pl.Int32, "continuation": pl.String, "reference": pl.String,
                                      "task": pl.String, "choice_group": pl.String, "choice_label": pl.String,
                                      "gold": pl.String})


def build_fleet(root: str, size: DemoSize, console: Console):
    """Pretrain and save the base; train and save every adapter. Returns (base model, tokenizer)."""
    tokenizer = build_tokenizer()
    base = build_base_model(tokenizer, seed=SEED)
    console.print(f"[bold]1/4[/] pretraining a {sum(p.numel() for p in base.parameters()):,}-parameter Llama "
                  f"on copying ({size.pretrain_steps} steps)")
    train(base, tokenizer, "copy", size.pretrain_steps, lr=3e-3, seed=SEED + 1, desc="pretrain base")
    for p in base.parameters():
        p.requires_grad_(False)
    save_base_model(base, tokenizer, join(root, "model"))
    console.print(f"[bold]2/4[/] LoRA-training {len(ADAPTERS)} adapters ({size.adapter_steps} steps each)")
    for i, adapter in enumerate(ADAPTERS):
        loss = train_adapter(base, tokenizer, adapter.task, LoraConfig(lora_dropout=0.0, **adapter.lora),
                             size.adapter_steps, seed=SEED + 100 + i, path=join(root, "adapters", adapter.adapter_id),
                             lr=adapter.lr)
        console.print(f"    {adapter.adapter_id:<16} task {adapter.task:<8} final loss {loss:.3f}")
    return base, tokenizer


def publish_swapped(root: str, base, tokenizer) -> None:
    """Republish SWAPPED from a much shorter training run, in place, as a careless deploy would."""
    adapter = next(a for a in ADAPTERS if a.adapter_id == SWAPPED)
    path = join(root, "adapters", SWAPPED)
    shutil.rmtree(path)
    train_adapter(base, tokenizer, adapter.task, LoraConfig(lora_dropout=0.0, **adapter.lora), SWAPPED_STEPS,
                  seed=SEED + 999, path=path, lr=adapter.lr)


def pipeline_night(root: str, progress: bool = True) -> Callable[[str], str]:
    """Run and score a night with the pipeline's calls; returns what to print about it."""
    config = EngineConfig(model=join(root, "model"), adapters=join(root, "adapters"), device="cpu",
                          dtype="float32", default_max_new_tokens=MAX_NEW_TOKENS)

    def run_night(date: str) -> str:
        summary = run_requests(config, requests_url(root, date), results_url(root, date), progress=progress,
                               log=logging.getLogger("lorafleet.demo"))
        nightly_metrics(root, date)
        return f"{summary.rows_ok} ok, {summary.rows_failed} failed, {summary.output_tokens_per_s:,.0f} output tokens/s"
    return run_night


def run_demo(root: str = "demo_data", size: str = "full", dates: list[str] | None = None,
             console: Console | None = None, progress: bool = True,
             run_night: Callable[[str], str] | None = None) -> DemoResult:
    """Train the fleet and evaluate its nights; `run_night(date)` runs and scores one night whose requests
    are written (default: pipeline_night) and returns a line to print about it."""
    root = os.path.abspath(root)
    with one_torch_thread():
        return _run_demo(root, SIZES[size], dates or nights_before_today(), console or Console(),
                         run_night or pipeline_night(root, progress))


def _run_demo(root: str, sizes: DemoSize, dates: list[str], console: Console,
              run_night: Callable[[str], str]) -> DemoResult:
    seed_everything(SEED)
    for folder in ("model", "adapters", "requests", "results", "metrics"):   # a rerun starts clean
        shutil.rmtree(join(root, folder), ignore_errors=True)
    base, tokenizer = build_fleet(root, sizes, console)

    console.print(f"[bold]3/4[/] {len(dates)} nights of requests: {', '.join(dates)}")
    for night, date in enumerate(dates):
        if night == len(dates) - 1:
            console.print(f"    [yellow]{date}: {SWAPPED} replaced by a {SWAPPED_STEPS}-step checkpoint "
                          f"(was {sizes.adapter_steps} steps)[/]", soft_wrap=True)
            publish_swapped(root, base, tokenizer)
        table = request_table(date, sizes)
        os.makedirs(requests_url(root, date), exist_ok=True)
        table.write_parquet(join(requests_url(root, date), "requests.parquet"))
        console.print(f"    {date}: {run_night(date)}", soft_wrap=True, highlight=False)

    console.print("[bold]4/4[/] the last night, compared with the night before")
    chart = report(root, dates[-1], None, console=console)
    metrics = pl.read_parquet(join(root, "metrics", f"date={dates[-1]}", "metrics.parquet"))
    return DemoResult(root, dates, metrics, chart)


def main(argv: list[str] | None = None, night_runner: Callable[[str], Callable[[str], str]] | None = None,
         prog: str = "python -m pipeline.demo") -> None:
    """The demo's command line; `night_runner(root)` makes its `run_night` (default: pipeline_night)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="demo_data", help="where the demo writes everything (default: demo_data)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    args = parser.parse_args(argv)
    console, root = Console(), os.path.abspath(args.root)
    result = run_demo(root, args.size, console=console, run_night=night_runner(root) if night_runner else None)
    for line in next_steps(result, args.root):
        console.print(line, soft_wrap=True, highlight=False)


def next_steps(result: DemoResult, root_arg: str) -> list[str]:
    """What to look at after the demo, and how: the chart, the results, the lorafleet command, the UI."""
    in_repo = result.root == os.path.abspath("demo_data")
    return [f"\nchart: {result.chart}",
            f"results: pl.read_parquet('{result.root}/results/**/*.parquet', hive_partitioning=True)",
            "the lorafleet command: .venv/bin/lorafleet (or `source .venv/bin/activate` first), e.g.",
            f"    .venv/bin/lorafleet report {root_arg} --date {result.dates[0]}   # nights: {', '.join(result.dates)}",
            f"the nights in Dagster: {'' if in_repo else f'LORAFLEET_ROOT={result.root} '}make ui"]

