"""Put a GPU run of bench_e2e into the README: its table, the issue's targets met or not, and its chart.

  python -m bench.publish bench/results     # the folder bench_e2e wrote (bench_e2e.json + bench_e2e.png)

Replaces what lies between the README's two bench markers and copies the chart to bench/figures/.
Only GPU runs are published: a --tiny run's numbers mean nothing.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.bench_e2e import COLUMNS, table_rows

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_e2e:start -->", "<!-- bench_e2e:end -->"
FIGURE = Path("bench/figures/bench_e2e.png")


def targets(cases: dict[str, dict]) -> list[tuple[str, str, bool | None]]:
    """(target, what was measured, met) for each of the issue's targets; met is None when not measured."""
    def case(name):
        return cases.get(name) or {}

    def ratio(a: dict, b: dict) -> float | None:
        return a["output_tokens_per_s"] / b["output_tokens_per_s"] if a and b else None

    n512, base, n8, n2048 = (case(f"lorafleet-{n}") for n in ("N512", "base", "N8", "N2048"))
    vs_base, vs_peft = n512.get("vs_base"), n512.get("vs_peft_mixed")
    big = base.get("roofline_fraction_batch64")
    vs_n8 = ratio(n2048, n8)
    planned_vs_arrival = [ratio(case(name.replace("arrival-", "")), c) for name, c in cases.items()
                          if name.startswith("lorafleet-arrival-")]
    worst_order = min(planned_vs_arrival, default=None)
    largest = max((c for name, c in cases.items() if name.startswith("lorafleet-N")), default={},
                  key=lambda c: c["n_adapters"])
    load_rate = largest.get("adapter_read_gb_per_s")
    waited = n2048["adapter_load_wait_s"] / n2048["wall_s"] if n2048 else None
    return [
        ("lorafleet at 512 adapters >= 90% of lorafleet-base",
         "-" if vs_base is None else f"{vs_base:.0%}", None if vs_base is None else vs_base >= 0.9),
        ("lorafleet at 512 adapters >= 100x PEFT mixed batches",
         "-" if vs_peft is None else f"{vs_peft:,.0f}x", None if vs_peft is None else vs_peft >= 100),
        ("decode steps at batch >= 64 within 1.5x of the roofline",
         "-" if big is None else f"{1 / big:.2f}x the roofline", None if big is None else 1 / big <= 1.5),
        ("N = 2,048 within 10% of N = 8 in output tokens/s",
         "-" if vs_n8 is None else f"{vs_n8:.0%}", None if vs_n8 is None else vs_n8 >= 0.9),
        ("the planner's order never slower than arrival order",
         "-" if worst_order is None else f"{worst_order:.2f}x at worst", None if worst_order is None
         else worst_order >= 1.0),
        (">= 10 GB/s effective adapter load rate (largest N)",
         "-" if not load_rate else f"{load_rate:.1f} GB/s", None if not load_rate else load_rate >= 10),
        ("device waiting for loads < 2% of the run at N = 2,048",
         "-" if waited is None else f"{waited:.1%}", None if waited is None else waited < 0.02),
    ]


def render(data: dict) -> str:
    meta, cases = data["meta"], data["cases"]
    mark = {True: "met", False: "**not met**", None: "not measured"}
    (p_lo, p_hi), (o_lo, o_hi) = meta["prompt_range"], meta["output_range"]
    lines = [f"Measured {meta['date']} on **{meta['device_name']}** (torch {meta['torch']}), {meta['model']} "
             f"{meta['dtype']}, `{meta['scale']}` scale: {meta['requests_per_case']:,} requests a case, each run to "
             f"the end, prompts {p_lo}-{p_hi} tokens, outputs {o_lo}-{o_hi}; whole run {meta['wall_s'] / 60:.1f} min.",
             "",
             "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(cases)]
    lines += ["", "| target | measured | |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {mark[met]} |" for name, value, met in targets({c["case"]: c for c in cases})]
    lines += ["", f"![bench_e2e chart]({FIGURE.as_posix()})"]
    return "\n".join(lines)


def publish(results: Path, readme: Path, figure: Path) -> None:
    data = json.loads((results / "bench_e2e.json").read_text())
    if data["meta"]["device"] != "cuda":
        raise SystemExit(f"{results} holds a {data['meta']['device']} run; only GPU runs go in the README")
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(data)}\n{END}{tail}")
    figure.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(results / "bench_e2e.png", figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the folder bench_e2e wrote its json and png to")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    publish(args.results, args.readme, args.readme.parent / FIGURE)
    print(f"published {args.results / 'bench_e2e.json'} into {args.readme}", file=sys.stderr)


if __name__ == "__main__":
    main()
