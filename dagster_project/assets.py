"""The night, as four daily assets; each is one call into pipeline/ plus the numbers a person wants in the UI.

The data lives at the URLs of pipeline.layout, so the assets return metadata only (MaterializeResult) and
pass nothing through an IO manager: each one reads what the one before it wrote. `generations` is a graph:
one step per adapter shard (LORAFLEET_ADAPTER_SHARDS, default 1), each on its own GPU, then their sum.
"""
import base64

import polars as pl
from dagster import (AssetExecutionContext, AssetIn, Config, ConfigMapping, In, MaterializeResult, MetadataValue,
                     Nothing, OpExecutionContext, Out, TableColumn, TableRecord, TableSchema, asset, graph_asset, op)

from pipeline.evaluation.metrics import nightly_metrics
from pipeline.evaluation.report import write_night_chart
from pipeline.layout import metrics_url, requests_url, results_url
from pipeline.plan import AdapterShard, Plan
from pipeline.requests import parse_requests, read_request_table
from pipeline.results import ResultStore
from pipeline.run import RunSummary, plan_run, run_requests
from pipeline.storage import join

from .partitions import daily
from .resources import LorafleetResource, adapter_shards_from_env

ADAPTER_SHARDS = adapter_shards_from_env()

WORST_ADAPTERS = 10
WORST_COLUMNS = ["adapter_label", "task", "requests", "error_rate", "exact_match", "chrf", "acc", "acc_norm",
                 "token_perplexity", "delta_exact_match", "delta_chrf", "delta_acc", "regressed_metrics"]
TABLE_TYPES = {pl.String: "string", pl.Int64: "int", pl.Float64: "float", pl.Boolean: "bool"}


class GenerationsConfig(Config):
    """Run config of `generations` (Launchpad: ops: generations: config: retry_errors: true)."""
    retry_errors: bool = False   # run the night's error rows again; their new rows replace the old ones


@asset(partitions_def=daily, kinds={"parquet"})
def requests(context: AssetExecutionContext, lorafleet: LorafleetResource) -> MaterializeResult:
    """The night's request table, validated: rows, adapters, and the bad rows that will become error rows."""
    url = requests_url(lorafleet.root, context.partition_key)
    table = read_request_table(url, lorafleet.storage_options, lorafleet.base_model_name)
    parsed = parse_requests(table, lorafleet.default_max_new_tokens)
    return MaterializeResult(metadata={
        "url": MetadataValue.path(url),
        "rows": table.num_rows,
        "valid_rows": len(parsed.requests),
        "bad_rows": len(parsed.rejected),
        "scored_rows": sum(r.is_scored for r in parsed.requests),
        "duplicate_ids": len(parsed.duplicates),
        "adapters": len({r.adapter_id for r in parsed.requests if r.adapter_id is not None}),
    })


@asset(partitions_def=daily, deps=[requests], kinds={"python"})
def inference_plan(context: AssetExecutionContext, lorafleet: LorafleetResource) -> MaterializeResult:
    """The adapter groups in waves that fit the GPU adapter budget, and the adapter loads they predict."""
    url = requests_url(lorafleet.root, context.partition_key)
    plans = plan_run(lorafleet.engine_config(), url, ADAPTER_SHARDS)
    tables = [p.format_table() for p in plans]
    if len(plans) > 1:
        tables = [f"adapter shard {s.index}/{s.count}\n{t}" for s, t in zip(ADAPTER_SHARDS, tables)]
    table = "\n\n".join(tables)
    context.log.info(f"plan for {context.partition_key}:\n{table}")
    return MaterializeResult(metadata={**Plan.concat(plans).summary(), "adapter_shards": len(ADAPTER_SHARDS),
                                       "plan": MetadataValue.md(f"```\n{table}\n```")})


def generate_step(shard: AdapterShard):
    """The step that runs one adapter shard's engine. Its pool, gpu-<i>, has one slot (dagster.yaml): a
    backfill queues the nights' engines instead of putting two on one GPU."""
    @op(name=f"generate_shard_{shard.index}", pool=f"gpu-{shard.index}", ins={"plan": In(Nothing)})
    def generate(context: OpExecutionContext, config: GenerationsConfig, lorafleet: LorafleetResource) -> RunSummary:
        date = context.partition_key
        return run_requests(lorafleet.engine_config(shard), requests_url(lorafleet.root, date),
                            results_url(lorafleet.root, date), run_id=context.run.run_id, adapter_shard=shard,
                            progress=False, retry_errors=config.retry_errors, log=context.log)
    return generate


def _each_shard(config: dict) -> dict:
    """The asset's run config (a GenerationsConfig), given to every shard's step."""
    return {f"generate_shard_{s.index}": {"config": config} for s in ADAPTER_SHARDS}


@op(out=Out(Nothing))
def sum_shards(context: OpExecutionContext, lorafleet: LorafleetResource, summaries: list[RunSummary]) -> None:
    """The metadata of `generations`: the adapter shards' summaries added up, and the night's error rate
    over every committed row (a resumed run's own rows would understate it)."""
    summary = RunSummary.combine(summaries)
    reasons = ResultStore(summary.output_url, lorafleet.storage_options).read_columns(["finish_reason"]).column(0)
    errors = reasons.to_pylist().count("error")
    context.add_output_metadata({
        **summary.to_dict(),
        "output_url": MetadataValue.path(summary.output_url),
        "adapter_shards": len(summaries),
        "rows": len(reasons),
        "error_rate": errors / len(reasons) if len(reasons) else 0.0,
    })


@graph_asset(partitions_def=daily, ins={"inference_plan": AssetIn(dagster_type=Nothing)},
             kinds={"pytorch", "parquet"},
             config=ConfigMapping(config_fn=_each_shard, config_schema=GenerationsConfig.to_config_schema()))
def generations(inference_plan):
    """One result row per request; a re-run resumes from the committed rows instead of starting over, and with
    `retry_errors` in its run config runs the error rows again."""
    return sum_shards([generate_step(shard)(inference_plan) for shard in ADAPTER_SHARDS])


@asset(partitions_def=daily, deps=[generations], kinds={"polars", "parquet"})
def adapter_metrics(context: AssetExecutionContext, lorafleet: LorafleetResource) -> MaterializeResult:
    """One row per adapter: error rate and scores, each compared with the adapter's previous night; and the
    night's chart (pipeline.evaluation.charts)."""
    date, so = context.partition_key, lorafleet.storage_options
    table = nightly_metrics(lorafleet.root, date, margin=lorafleet.regression_margin, storage_options=so)
    worst = table.sort(["regressed", "error_rate", "chrf"], descending=[True, True, False], nulls_last=True)
    chart_url = join(metrics_url(lorafleet.root, date), "scores.png")
    png = write_night_chart(lorafleet.root, date, chart_url, lorafleet.regression_margin, so)
    return MaterializeResult(metadata={
        "url": MetadataValue.path(metrics_url(lorafleet.root, date)),
        "adapters": table.height,
        "regressed": table.filter(pl.col("regressed"))["adapter_label"].to_list(),
        "worst_adapters": metadata_table(worst.head(WORST_ADAPTERS).select(WORST_COLUMNS)),
        "chart": MetadataValue.md(f"![scores of {date}](data:image/png;base64,{base64.b64encode(png).decode()})"),
        "chart_url": MetadataValue.path(chart_url),
    })


def metadata_table(table: pl.DataFrame) -> MetadataValue:
    """A table the UI shows as one (markdown would take the base model's `<base>` for an HTML tag)."""
    schema = TableSchema(columns=[TableColumn(name, TABLE_TYPES.get(dtype, "string"))
                                  for name, dtype in table.schema.items()])
    rows = [{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            for row in table.iter_rows(named=True)]
    return MetadataValue.table([TableRecord(row) for row in rows], schema=schema)
