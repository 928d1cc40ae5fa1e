"""The night, as four daily assets; each is one call into pipeline/ plus the numbers a person wants in the UI.

The data lives at the URLs of pipeline.layout, so the assets return metadata only (MaterializeResult) and
pass nothing through an IO manager: each one reads what the one before it wrote.
"""
import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from pipeline.layout import metrics_url, requests_url, results_url
from pipeline.metrics import nightly_metrics
from pipeline.requests import parse_requests, read_request_table
from pipeline.run import plan_run, run_requests

from .partitions import daily
from .resources import LorafleetResource

WORST_ADAPTERS = 10
WORST_COLUMNS = ["adapter_label", "task", "requests", "error_rate", "exact_match", "chrf", "delta_exact_match",
                 "delta_chrf", "regressed_metrics"]


@asset(partitions_def=daily, kinds={"parquet"})
def requests(context: AssetExecutionContext, lorafleet: LorafleetResource) -> MaterializeResult:
    """The night's request table, validated: rows, adapters, and the bad rows that will become error rows."""
    url = requests_url(lorafleet.root, context.partition_key)
    table = read_request_table(url, lorafleet.storage_options)
    parsed = parse_requests(table, lorafleet.default_max_new_tokens)
    return MaterializeResult(metadata={
        "url": MetadataValue.path(url),
        "rows": table.num_rows,
        "valid_rows": len(parsed.requests),
        "bad_rows": len(parsed.rejected),
        "duplicate_ids": len(parsed.duplicates),
        "adapters": len({r.adapter_id for r in parsed.requests if r.adapter_id is not None}),
    })


@asset(partitions_def=daily, deps=[requests], kinds={"python"})
def inference_plan(context: AssetExecutionContext, lorafleet: LorafleetResource) -> MaterializeResult:
    """The adapter groups in waves that fit the GPU adapter budget, and the adapter loads they predict."""
    plan = plan_run(lorafleet.engine_config(), requests_url(lorafleet.root, context.partition_key))
    table = plan.format_table()
    context.log.info(f"plan for {context.partition_key}:\n{table}")
    return MaterializeResult(metadata={**plan.summary(), "plan": MetadataValue.md(f"```\n{table}\n```")})


@asset(partitions_def=daily, deps=[inference_plan], pool="gpu", kinds={"pytorch", "parquet"})
def generations(context: AssetExecutionContext, lorafleet: LorafleetResource) -> MaterializeResult:
    """One result row per request; a re-run resumes from the committed shards instead of starting over."""
    date = context.partition_key
    summary = run_requests(lorafleet.engine_config(), requests_url(lorafleet.root, date),
                           results_url(lorafleet.root, date), run_id=context.run.run_id, progress=False,
                           log=context.log)
    finished = summary.rows_ok + summary.rows_failed
    return MaterializeResult(metadata={
        **summary.to_dict(),
        "output_url": MetadataValue.path(summary.output_url),
        "rows": finished + summary.rows_skipped,
        "error_rate": summary.rows_failed / finished if finished else 0.0,
    })


@asset(partitions_def=daily, deps=[generations], kinds={"polars", "parquet"})
def adapter_metrics(context: AssetExecutionContext, lorafleet: LorafleetResource) -> MaterializeResult:
    """One row per adapter: error rate and scores, each compared with the adapter's previous night."""
    date = context.partition_key
    table = nightly_metrics(lorafleet.root, date, margin=lorafleet.regression_margin,
                            storage_options=lorafleet.storage_options)
    worst = table.sort(["regressed", "error_rate", "chrf"], descending=[True, True, False], nulls_last=True)
    return MaterializeResult(metadata={
        "url": MetadataValue.path(metrics_url(lorafleet.root, date)),
        "adapters": table.height,
        "regressed": table.filter(pl.col("regressed"))["adapter_label"].to_list(),
        "worst_adapters": MetadataValue.md(markdown_table(worst.head(WORST_ADAPTERS).select(WORST_COLUMNS))),
    })


def markdown_table(table: pl.DataFrame) -> str:
    def cell(value) -> str:
        return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + " --- |" * table.width]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in table.iter_rows()])
