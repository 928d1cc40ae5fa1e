"""Asset checks of a night: every request has exactly one result row, few errors, no regressed adapter.

Each check is a plain function of (resource, date) that tests call on hand-made tables; the decorated
checks only hand them the run's partition.
"""
import warnings
from collections import Counter

import polars as pl
from dagster import AssetCheckExecutionContext, AssetCheckResult, PreviewWarning, asset_check

from pipeline.evaluation.metrics import read_metrics
from pipeline.layout import metrics_url, requests_url, results_url
from pipeline.requests import read_request_table
from pipeline.results import ResultStore

from .assets import adapter_metrics, generations
from .partitions import daily
from .resources import LorafleetResource

EXAMPLES = 10  # ids or errors a check names in its metadata

# Partitioned checks (a result per night in the UI, runnable for one night) are "preview" in Dagster 1.13.
warnings.filterwarnings("ignore", "Specifying a partitions_def on an AssetCheckSpec", PreviewWarning)


def read_result_columns(url: str, columns: list[str], storage_options: dict | None = None) -> pl.DataFrame:
    return pl.from_arrow(ResultStore(url, storage_options).read_columns(columns))


def result_id_problems(request_ids: list[str | None], result_ids: list[str | None]) -> dict[str, list[str]]:
    """Requests without a result row, result rows of no request, and ids with more than one result row.
    A row without a request_id (a rejected row) has no id to match, so it is left out on both sides."""
    requested = set(request_ids) - {None, ""}   # a row with an empty id is rejected like one with none
    counts = Counter(i for i in result_ids if i is not None)
    return {
        "missing": sorted(requested - counts.keys()),
        "unexpected": sorted(counts.keys() - requested),
        "duplicated": sorted(i for i, n in counts.items() if n > 1),
    }


def one_result_per_request(lorafleet: LorafleetResource, date: str) -> AssetCheckResult:
    requested = read_request_table(requests_url(lorafleet.root, date), lorafleet.storage_options,
                                   lorafleet.base_model_name)
    results = read_result_columns(results_url(lorafleet.root, date), ["request_id"], lorafleet.storage_options)
    request_ids = requested.column("request_id").to_pylist()
    problems = result_id_problems(request_ids, results["request_id"].to_list())
    return AssetCheckResult(
        passed=not any(problems.values()),
        metadata={"requests": len(set(request_ids) - {None, ""}), "result_rows": results.height,
                  **{kind: len(ids) for kind, ids in problems.items()},
                  **{f"{kind}_examples": ids[:EXAMPLES] for kind, ids in problems.items() if ids}},
    )


def error_rate_within_bound(lorafleet: LorafleetResource, date: str) -> AssetCheckResult:
    results = read_result_columns(results_url(lorafleet.root, date), ["finish_reason", "error"],
                                  lorafleet.storage_options)
    errors = results.filter(pl.col("finish_reason") == "error")
    error_rate = errors.height / results.height if results.height else 0.0
    common = errors.group_by("error").len().sort(["len", "error"], descending=[True, False]).head(EXAMPLES)
    return AssetCheckResult(
        passed=error_rate <= lorafleet.max_error_rate,
        metadata={"error_rate": error_rate, "bound": lorafleet.max_error_rate, "errors": errors.height,
                  "rows": results.height, "common_errors": {str(e): n for e, n in common.iter_rows()}},
    )


def regressions(lorafleet: LorafleetResource, date: str) -> AssetCheckResult:
    url = metrics_url(lorafleet.root, date)
    metrics = read_metrics(url, lorafleet.storage_options)
    if metrics.is_empty():
        return AssetCheckResult(passed=False, description=f"no metrics under {url}")
    regressed = metrics.filter(pl.col("regressed")).sort("adapter_label")
    names = regressed["adapter_label"].to_list()
    return AssetCheckResult(
        passed=not names,
        description=f"regressed adapters: {', '.join(names)}" if names else "no adapter regressed",
        metadata={"regressed": names, "regressed_metrics": dict(regressed.select("adapter_label",
                                                                                 "regressed_metrics").rows())},
    )


@asset_check(asset=generations, partitions_def=daily)
def every_request_has_one_result(context: AssetCheckExecutionContext,
                                 lorafleet: LorafleetResource) -> AssetCheckResult:
    """Each request id of the day's request files (valid or rejected; a duplicated id once) has one result row."""
    return one_result_per_request(lorafleet, context.partition_key)


@asset_check(asset=generations, partitions_def=daily)
def error_rate_under_bound(context: AssetCheckExecutionContext, lorafleet: LorafleetResource) -> AssetCheckResult:
    """The share of the day's result rows that failed is at most the resource's max_error_rate."""
    return error_rate_within_bound(lorafleet, context.partition_key)


@asset_check(asset=adapter_metrics, partitions_def=daily)
def no_regressions(context: AssetCheckExecutionContext, lorafleet: LorafleetResource) -> AssetCheckResult:
    """No adapter's score dropped from its previous night by more than the regression margin."""
    return regressions(lorafleet, context.partition_key)
