"""The asset checks as plain functions on hand-made request, result and metrics tables."""
import polars as pl

from dagster_project.checks import error_rate_within_bound, one_result_per_request, regressions, result_id_problems
from dagster_project.resources import LorafleetResource
from fleet_tables import DATES, write_requests, write_results
from pipeline.layout import metrics_url

DAY = DATES[0]


def request_rows() -> list[dict]:
    return [{"request_id": "r1", "adapter_id": "a", "prompt": "w1"},
            {"request_id": "r2", "adapter_id": "b", "prompt": "w2"},
            {"request_id": "r2", "adapter_id": "b", "prompt": "w2 again"},   # a duplicate counts once
            {"request_id": "r3", "adapter_id": "not ok!", "prompt": "w3"},   # rejected, still needs its row
            {"request_id": None, "adapter_id": "a", "prompt": "w4"}]         # no id: nothing to match


def ok(request_id: str) -> dict:
    return {"request_id": request_id, "finish_reason": "stop", "output_text": "w5"}


def failed(request_id: str, error: str) -> dict:
    return {"request_id": request_id, "finish_reason": "error", "error": error}


def test_result_id_problems_names_missing_unexpected_and_duplicated_ids():
    assert result_id_problems(["a", "b", "b", None], ["b", "a", None, None]) == \
        {"missing": [], "unexpected": [], "duplicated": []}
    assert result_id_problems(["a", "b", "c"], ["a", "a", "d"]) == \
        {"missing": ["b", "c"], "unexpected": ["d"], "duplicated": ["a"]}


def test_one_result_per_request_passes_on_a_complete_day(tmp_path):
    write_requests(tmp_path, DAY, request_rows())
    write_results(tmp_path, DAY, [ok("r1"), ok("r2")], name="part-000000.parquet")
    write_results(tmp_path, DAY, [failed("r3", "bad adapter_id"), failed(None, "no request_id")],
                  name="part-000001.parquet")
    result = one_result_per_request(LorafleetResource(root=str(tmp_path)), DAY)
    assert result.passed
    assert {k: result.metadata[k].value for k in ["requests", "result_rows", "missing", "duplicated"]} == \
        {"requests": 3, "result_rows": 4, "missing": 0, "duplicated": 0}


def test_one_result_per_request_fails_on_a_missing_or_doubled_row(tmp_path):
    fleet = LorafleetResource(root=str(tmp_path))
    write_requests(tmp_path, DAY, request_rows())
    shard = write_results(tmp_path, DAY, [ok("r1"), failed("r3", "bad adapter_id")])
    result = one_result_per_request(fleet, DAY)
    assert not result.passed
    assert result.metadata["missing"].value == 1 and result.metadata["missing_examples"].value == ["r2"]

    write_results(tmp_path, DAY, [ok("r2"), ok("r1"), ok("r9")], name="part-000001.parquet")
    result = one_result_per_request(fleet, DAY)
    assert not result.passed
    assert (result.metadata["duplicated_examples"].value, result.metadata["unexpected_examples"].value) == \
        (["r1"], ["r9"])

    shard.unlink()
    (shard.parent / "_runs").mkdir()   # run records beside the shards are not result rows
    write_results(tmp_path, DAY, [ok("r1"), failed("r3", "x")], name="_runs/part-000000.parquet")
    result = one_result_per_request(fleet, DAY)
    assert result.metadata["missing_examples"].value == ["r3"]


def test_error_rate_check_compares_the_days_error_share_with_the_bound(tmp_path):
    write_results(tmp_path, DAY, [ok("r1"), ok("r2"), ok("r3"), failed("r4", "adapter x: not found"),
                                  failed("r5", "adapter x: not found"), failed("r6", "prompt too long")])
    within = error_rate_within_bound(LorafleetResource(root=str(tmp_path), max_error_rate=0.5), DAY)
    assert within.passed and within.metadata["error_rate"].value == 0.5
    assert within.metadata["common_errors"].value == {"adapter x: not found": 2, "prompt too long": 1}
    over = error_rate_within_bound(LorafleetResource(root=str(tmp_path), max_error_rate=0.4), DAY)
    assert not over.passed and over.metadata["bound"].value == 0.4


def test_error_rate_check_of_a_day_without_results_passes_with_zero_rows(tmp_path):
    result = error_rate_within_bound(LorafleetResource(root=str(tmp_path)), DAY)
    assert result.passed and result.metadata["rows"].value == 0


def write_metrics(root, date: str, regressed_metrics: dict[str | None, str]) -> None:
    """A night's metrics: adapter_id -> the comma-joined scores that regressed ("" = none)."""
    folder = metrics_url(str(root), date)
    pl.DataFrame({"date": date, "adapter_id": list(regressed_metrics),
                  "adapter_label": [a or "<base>" for a in regressed_metrics],
                  "regressed": [bool(m) for m in regressed_metrics.values()],
                  "regressed_metrics": list(regressed_metrics.values())}).write_parquet(f"{folder}/metrics.parquet",
                                                                                     mkdir=True)


def test_regression_check_fails_naming_the_regressed_adapters(tmp_path):
    fleet = LorafleetResource(root=str(tmp_path))
    write_metrics(tmp_path, DATES[0], {"sort": "", "reverse": "", None: ""})
    write_metrics(tmp_path, DATES[1], {"sort": "chrf", "reverse": "", None: "exact_match,error_rate"})
    assert regressions(fleet, DATES[0]).passed
    result = regressions(fleet, DATES[1])
    assert not result.passed and result.description == "regressed adapters: <base>, sort"
    assert result.metadata["regressed_metrics"].value == {"<base>": "exact_match,error_rate", "sort": "chrf"}


def test_regression_check_fails_on_a_night_without_metrics(tmp_path):
    result = regressions(LorafleetResource(root=str(tmp_path)), DATES[0])
    assert not result.passed and "no metrics under" in result.description
