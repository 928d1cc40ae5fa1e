"""Two nights materialized in process: the four assets, their metadata, their checks, and a removed row."""
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
import yaml

from dagster_project.assets import adapter_metrics, generations, inference_plan, requests
from dagster_project.checks import error_rate_under_bound, every_request_has_one_result, no_regressions
from dagster_project.resources import LorafleetResource
from dagster_project.ui import INSTANCE_CONFIG
from fleet_tables import ADAPTER_IDS, DATES
from pipeline.layout import requests_url, results_url
from pipeline.results import ResultStore

ASSETS = [requests, inference_plan, generations, adapter_metrics]
CHECKS = [every_request_has_one_result, error_rate_under_bound, no_regressions]


def metadata(result: dg.ExecuteInProcessResult, asset: dg.AssetsDefinition) -> dict:
    [materialization] = result.asset_materializations_for_node(asset.node_def.name)
    return {k: v.value for k, v in materialization.metadata.items()}


def checks_passed(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_two_nights_materialize_with_metadata_and_passing_checks(lorafleet):
    with dg.instance_for_test() as instance:
        for date in DATES:
            result = dg.materialize([*ASSETS, *CHECKS], partition_key=date, resources={"lorafleet": lorafleet},
                                    instance=instance)
            assert result.success
            assert checks_passed(result) == {c.check_key.name: True for c in CHECKS}

            assert {k: metadata(result, requests)[k] for k in ["rows", "valid_rows", "bad_rows", "duplicate_ids",
                                                               "adapters"]} == \
                {"rows": 9, "valid_rows": 7, "bad_rows": 1, "duplicate_ids": 1, "adapters": 3}
            plan = metadata(result, inference_plan)
            assert plan["requests"] == 7 and plan["adapters"] == 3 and plan["waves"] >= 1
            assert "predicted adapter loads" in plan["plan"]
            run = metadata(result, generations)
            assert (run["rows"], run["rows_ok"], run["rows_failed"], run["rows_skipped"]) == (8, 6, 2, 0)
            assert run["error_rate"] == 0.25 and run["adapter_loads"] >= 2
            assert run["output_tokens_per_s"] > 0 and run["wall_s"] > 0
            scores = metadata(result, adapter_metrics)
            assert scores["adapters"] == 5 and scores["regressed"] == []
            worst = scores["worst_adapters"]                  # a table, so `<base>` is not taken for a tag
            assert [c.name for c in worst.schema.columns][:4] == ["adapter_label", "task", "requests", "error_rate"]
            labels = [row.data["adapter_label"] for row in worst.records]   # worst (all rows failed) first
            assert sorted(labels[:2]) == ["ghost", "not ok!"]
            assert sorted(labels[2:]) == sorted(["<base>", *ADAPTER_IDS])
            assert scores["chart"].startswith(f"![scores of {date}](data:image/png;base64,iVBORw0KGgo")
            assert Path(scores["chart_url"]).read_bytes().startswith(b"\x89PNG")

            logs = [e.user_message for e in instance.all_logs(result.run_id)]
            assert any("7 requests (0 already done, 1 invalid rows)" in m for m in logs)  # run_requests' log lines
    results = pl.read_parquet(f"{lorafleet.root}/results/**/*.parquet", hive_partitioning=True)
    assert results.group_by(pl.col("date").cast(pl.String)).len().sort("date").rows() == [(d, 8) for d in DATES]


def test_a_removed_result_row_fails_the_check_and_a_rerun_brings_it_back(lorafleet):
    date = DATES[0]
    with dg.instance_for_test() as instance:
        def run(selection) -> dg.ExecuteInProcessResult:
            return dg.materialize([*ASSETS, *CHECKS], selection=selection, partition_key=date,
                                  resources={"lorafleet": lorafleet}, instance=instance)

        assert run(dg.AssetSelection.assets(requests, inference_plan, generations)).success
        shard = ResultStore(results_url(lorafleet.root, date)).shard_paths()[0]
        rows = pq.read_table(shard)
        removed = rows["request_id"][0].as_py()
        pq.write_table(rows.slice(1), shard)

        # materialize() takes the partition from a selected asset, so `requests` comes along with the check
        check_only = dg.AssetSelection.assets(requests) | dg.AssetSelection.checks(every_request_has_one_result)
        [evaluation] = run(check_only).get_asset_check_evaluations()
        assert not evaluation.passed and evaluation.metadata["missing_examples"].value == [removed]

        rerun = run(dg.AssetSelection.assets(generations))
        resumed = metadata(rerun, generations)
        assert resumed["rows_skipped"] == 7 and resumed["rows_ok"] + resumed["rows_failed"] == 1   # not started over
        assert (resumed["rows"], resumed["error_rate"]) == (8, 0.25)          # the night's, not this run's
        assert checks_passed(rerun)["every_request_has_one_result"]


def test_retry_errors_in_run_config_reruns_the_error_rows_once(lorafleet, tmp_path):
    """`ghost` is published after the night ran: a run with retry_errors gives its row a result, replacing the
    error row, and the night still has one row per request."""
    adapters = tmp_path / "adapters"
    shutil.copytree(lorafleet.adapters, adapters)
    fleet = LorafleetResource(**{**lorafleet.model_dump(), "adapters": str(adapters)})
    date = DATES[0]
    with dg.instance_for_test() as instance:
        def run(**run_config) -> dg.ExecuteInProcessResult:
            return dg.materialize([*ASSETS, *CHECKS], selection=dg.AssetSelection.assets(generations),
                                  partition_key=date, resources={"lorafleet": fleet}, instance=instance,
                                  run_config={"ops": {"generations": {"config": run_config}}} if run_config else None)

        assert metadata(run(), generations)["error_rate"] == 0.25
        shutil.copytree(adapters / ADAPTER_IDS[0], adapters / "ghost")
        assert metadata(run(), generations)["rows_skipped"] == 8           # error rows count as done...
        retried = run(retry_errors=True)                                     # ...until retried
        night = metadata(retried, generations)
        assert (night["rows_retried"], night["rows_ok"], night["rows_failed"]) == (2, 1, 1)   # `bad` stays bad
        assert (night["rows"], night["error_rate"]) == (8, 0.125)
        assert checks_passed(retried)["every_request_has_one_result"]
    results = pl.read_parquet(f"{results_url(fleet.root, date)}/*.parquet")
    assert results.filter(pl.col("request_id") == "ghost")["finish_reason"].to_list() == ["length"]


def test_generations_waits_while_another_engine_holds_the_gpu_pool(lorafleet):
    """The instance config `make ui` uses gives the `gpu-0` pool one slot: a second night's engine waits."""
    with dg.instance_for_test(overrides=yaml.safe_load(INSTANCE_CONFIG.read_text())) as instance, \
            ThreadPoolExecutor(1) as pool:
        slots = instance.event_log_storage
        slots.initialize_concurrency_limit_to_default("gpu-0")
        assert slots.claim_concurrency_slot("gpu-0", "engine-of-another-run", "generations").is_claimed
        future = pool.submit(dg.materialize, ASSETS, selection=[generations], partition_key=DATES[0],
                             resources={"lorafleet": lorafleet}, instance=instance)

        def messages() -> list[str]:
            return [e.user_message for run in instance.get_runs() for e in instance.all_logs(run.run_id)]

        deadline = time.monotonic() + 60
        while not any("blocked by limit for pool gpu-0" in m for m in messages()):
            assert time.monotonic() < deadline and not future.done(), messages()
            time.sleep(0.5)
        assert not any('Started execution of step "generations.generate_shard_0"' in m for m in messages())
        slots.free_concurrency_slots_for_run("engine-of-another-run")
        assert future.result(timeout=120).success


def test_a_night_with_a_batch_file_beside_its_parquet_runs_both(lorafleet):
    date = DATES[0]
    lines = [{"custom_id": "j1", "method": "POST", "url": "/v1/completions",
              "body": {"model": ADAPTER_IDS[0], "prompt": "w1 w2", "max_tokens": 2}},
             {"custom_id": "j2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "w3", "n": 4}}]
    (Path(requests_url(lorafleet.root, date)) / "batch.jsonl").write_text("\n".join(map(json.dumps, lines)))
    with dg.instance_for_test() as instance:
        selection = dg.AssetSelection.assets(requests, inference_plan, generations)
        result = dg.materialize([*ASSETS, *CHECKS], partition_key=date, resources={"lorafleet": lorafleet},
                                instance=instance, selection=selection)
    assert result.success and checks_passed(result)["every_request_has_one_result"]
    assert (metadata(result, requests)["rows"], metadata(result, requests)["bad_rows"]) == (11, 2)
    run = metadata(result, generations)
    assert (run["rows"], run["rows_ok"], run["rows_failed"]) == (10, 7, 3)
    rows = ResultStore(results_url(lorafleet.root, date)).read_columns(["request_id", "error"]).to_pylist()
    assert "body.n = 4 is not supported" in next(r["error"] for r in rows if r["request_id"] == "j2")
