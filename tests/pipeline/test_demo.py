"""The demo at its small size: real LoRA adapters, run by the engine through Dagster, scored by the nightly
metrics (the session's `demo_nights`, tests/conftest.py: a minute or two on 2 CPU cores).
"""
import polars as pl
import pytest

from pipeline.demo.nights import ADAPTERS, SWAPPED, next_steps
from pipeline.evaluation.metrics import read_metrics, score_groups


@pytest.fixture
def demo(demo_nights):
    return demo_nights.result, demo_nights.printed


def night_results(root: str, date: str) -> pl.DataFrame:
    return pl.read_parquet(f"{root}/results/date={date}/*.parquet")


def test_each_adapter_solves_its_task_and_the_base_does_not(demo):
    result, _ = demo
    dates = result.dates
    results = night_results(result.root, dates[0])
    assert (results["finish_reason"] != "error").all()
    scores = score_groups(results, ["adapter_id", "task"])
    exact = {(row["adapter_id"], row["task"]): row["exact_match"] for row in scores.iter_rows(named=True)}
    for adapter in ADAPTERS:
        own, base = exact[(adapter.adapter_id, adapter.task)], exact[(None, adapter.task)]
        assert own >= 0.8, f"{adapter.adapter_id} scores {own} on {adapter.task}"
        assert own - base >= 0.6, f"{adapter.adapter_id} {own} vs base {base} on {adapter.task}"


def test_each_adapter_answers_its_own_questions_and_the_base_does_not(demo):
    result, _ = demo
    scores = score_groups(night_results(result.root, result.dates[0]), ["adapter_id", "task"])
    acc = {(row["adapter_id"], row["task"]): (row["acc"], row["acc_norm"]) for row in scores.iter_rows(named=True)}
    for adapter in ADAPTERS:
        own, own_norm = acc[(adapter.adapter_id, adapter.task)]
        assert own >= 0.8 and own_norm >= 0.8, f"{adapter.adapter_id} acc {own} on {adapter.task}"
    # the base has a few questions per task (one may fall its way by chance): all of them, chance being 0.25
    base = score_groups(night_results(result.root, result.dates[0]).filter(pl.col("adapter_id").is_null()), ["adapter_id"])
    assert base["acc"].item() <= 0.5, base


def test_the_planted_regression_is_the_one_flagged(demo):
    result, printed = demo
    dates = result.dates
    metrics = read_metrics(f"{result.root}/metrics")
    assert sorted(metrics["date"].unique().to_list()) == dates
    regressed = {date: metrics.filter((pl.col("date") == date) & pl.col("regressed"))["adapter_label"].to_list()
                 for date in dates}
    assert regressed == {dates[0]: [], dates[1]: [], dates[2]: [SWAPPED]}
    swapped = result.metrics.filter(pl.col("adapter_id") == SWAPPED).row(0, named=True)
    assert {"exact_match", "acc"} <= set(swapped["regressed_metrics"].split(","))
    assert swapped["delta_exact_match"] <= -0.3 and swapped["delta_acc"] < -0.05
    # the same prompts every night: the adapters nobody touched score exactly as the night before
    steady = result.metrics.filter(pl.col("adapter_id") != SWAPPED)
    assert steady["delta_exact_match"].to_list() == [0.0] * steady.height
    assert steady["delta_acc"].to_list() == [0.0] * steady.height
    assert f"regressed: {SWAPPED} ({swapped['regressed_metrics']})" in printed
    # each night went through Dagster's nightly job with its checks; the last night's no_regressions failed
    nights = [line for line in printed.splitlines() if "checks:" in line]
    assert [line.split(":")[0].strip() for line in nights] == dates
    assert ["no_regressions FAILED" in line for line in nights] == [False, False, True]
    assert all("every_request_has_one_result passed" in line for line in nights)


def test_demo_says_how_to_reach_lorafleet_and_the_nights_it_wrote(demo):
    result, _ = demo
    said = "\n".join(next_steps(result, "demo_data"))
    assert ".venv/bin/lorafleet" in said and "source .venv/bin/activate" in said
    assert f"lorafleet report demo_data --date {result.dates[0]}" in said
    assert f"LORAFLEET_ROOT={result.root} make ui" in said       # not the repo's demo_data: say which root


def test_demo_writes_a_deployment_layout(demo):
    result, _ = demo
    dates = result.dates
    with open(result.chart, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    requests = pl.read_parquet(f"{result.root}/requests/date={dates[0]}/requests.parquet")
    assert requests.columns == ["request_id", "adapter_id", "prompt", "max_new_tokens", "continuation", "reference",
                                "task", "choice_group", "choice_label", "gold"]
    assert requests["adapter_id"].null_count() > 0
    # a row generates (max_new_tokens) or is scored (continuation), never both
    assert (requests["max_new_tokens"].is_null() != requests["continuation"].is_null()).all()
    results = night_results(result.root, dates[0])
    assert results.height == requests.height
    assert {"reference", "task", "choice_group", "gold"} <= set(results.columns)
    assert results.filter(pl.col("finish_reason") == "scored").height == requests["continuation"].is_not_null().sum()
