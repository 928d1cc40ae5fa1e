"""The Definitions load; the resource reads its env vars; the schedule and the sensor pick the right days."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest

from dagster_project import defs
from dagster_project.assets import generations
from dagster_project.partitions import daily, first_night
from dagster_project.resources import DEMO_ROOT, LorafleetResource, adapter_shards_from_env
from dagster_project.schedules import new_requests_sensor, nightly_schedule
from dagster_project.ui import prepare_home
from fleet_tables import DATES, write_requests
from pipeline.layout import nights_before_today
from pipeline.plan import AdapterShard

ASSETS = ["requests", "inference_plan", "generations", "adapter_metrics"]
CHECKS = {("generations", "every_request_has_one_result"), ("generations", "error_rate_under_bound"),
          ("adapter_metrics", "no_regressions")}
ENV_VARS = ["ROOT", "MODEL", "ADAPTERS", "DEVICE", "DTYPE", "MAX_ACTIVE_ADAPTERS", "MAX_ERROR_RATE"]
ROW = {"request_id": "r0", "adapter_id": "a0", "prompt": "w1 w2"}


def test_definitions_load_the_chain_its_checks_and_the_gpu_pool():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert sorted(k.to_user_string() for k in graph.get_all_asset_keys()) == sorted(ASSETS)
    for upstream, downstream in zip(ASSETS, ASSETS[1:]):
        assert graph.get(dg.AssetKey(downstream)).parent_keys == {dg.AssetKey(upstream)}
    assert {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys} == CHECKS
    assert {step.name: step.pool for step in generations.node_def.node_defs} == \
        {"generate_shard_0": "gpu-0", "sum_shards": None}
    assert defs.executor.name == "in_process"
    job = defs.resolve_job_def("nightly")
    assert job.partitions_def == daily
    assert {(k.asset_key.to_user_string(), k.name) for k in job.asset_layer.asset_graph.asset_check_keys} == CHECKS
    assert defs.resolve_schedule_def("nightly_schedule").cron_schedule == "0 2 * * *"
    assert defs.resolve_sensor_def("new_requests_sensor").job_name == "nightly"


def test_partitions_are_complete_days():
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%d")
    assert daily.get_last_partition_key() == yesterday
    assert all(daily.has_partition_key(d) for d in DATES)
    assert not daily.has_partition_key(datetime.now(timezone.utc).strftime("%Y-%m-%d"))


def test_partitions_start_at_the_first_night_with_requests(tmp_path):
    env = {"LORAFLEET_ROOT": str(tmp_path)}
    assert first_night(env) == nights_before_today()[0]          # no data yet: where the demo will write
    for day in ["not-a-date", *reversed(DATES)]:
        write_requests(tmp_path, day, [ROW])
    assert first_night(env) == DATES[0]
    assert first_night({**env, "LORAFLEET_START_DATE": "2025-06-01"}) == "2025-06-01"


def test_resource_defaults_to_the_demo_data(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(f"LORAFLEET_{name}", raising=False)
    fleet = LorafleetResource.from_env()
    assert fleet.root == DEMO_ROOT == str(Path(__file__).resolve().parents[2] / "demo_data")
    config = fleet.engine_config()
    assert (config.model, config.adapters) == (f"{DEMO_ROOT}/model", f"{DEMO_ROOT}/adapters")


def test_resource_takes_each_setting_from_its_env_var(monkeypatch):
    env = {"ROOT": "s3://bucket/fleet", "MODEL": "/models/base", "ADAPTERS": "s3://bucket/adapters",
           "DEVICE": "cpu", "DTYPE": "float16", "MAX_ACTIVE_ADAPTERS": "3", "MAX_ERROR_RATE": "0.25"}
    for name, value in env.items():
        monkeypatch.setenv(f"LORAFLEET_{name}", value)
    fleet = LorafleetResource.from_env()
    assert (fleet.root, fleet.max_error_rate) == ("s3://bucket/fleet", 0.25)
    config = fleet.engine_config()
    assert (config.model, config.adapters, config.device, config.dtype, config.max_active_adapters) == \
        ("/models/base", "s3://bucket/adapters", "cpu", "float16", 3)
    monkeypatch.delenv("LORAFLEET_MODEL")
    assert LorafleetResource.from_env().engine_config().model == "s3://bucket/fleet/model"


def test_adapter_shards_come_from_their_env_var():
    assert adapter_shards_from_env({}) == [AdapterShard(0, 1)]
    assert adapter_shards_from_env({"LORAFLEET_ADAPTER_SHARDS": "3"}) == [AdapterShard(i, 3) for i in range(3)]
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="LORAFLEET_ADAPTER_SHARDS"):
            adapter_shards_from_env({"LORAFLEET_ADAPTER_SHARDS": bad})


def test_instance_config_limits_the_gpu_pool_to_one(tmp_path):
    home = prepare_home(tmp_path / "home")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.global_op_concurrency_default_limit == 1


def test_request_days_lists_days_with_parquet_and_batch_files(tmp_path):
    fleet = LorafleetResource(root=str(tmp_path))
    assert fleet.request_days() == {}
    write_requests(tmp_path, DATES[1], [ROW])
    write_requests(tmp_path, DATES[0], [ROW], name="b.parquet")
    write_requests(tmp_path, DATES[0], [ROW], name="a.parquet")
    (tmp_path / "requests" / f"date={DATES[0]}" / "c.jsonl").write_text("{}\n")   # OpenAI batch files count
    write_requests(tmp_path, DATES[0], [ROW], name="_partial.parquet")   # '_' names are not data
    (tmp_path / "requests" / "date=2026-01-03").mkdir()                   # an empty day
    days = fleet.request_days()
    assert list(days) == DATES
    assert [Path(p).name for p in days[DATES[0]]] == ["a.parquet", "b.parquet", "c.jsonl"]


def test_schedule_runs_the_previous_day_and_skips_a_day_without_requests(tmp_path):
    fleet = LorafleetResource(root=str(tmp_path))
    at_2am = datetime(2026, 1, 3, 2, tzinfo=timezone.utc)
    context = dg.build_schedule_context(scheduled_execution_time=at_2am, resources={"lorafleet": fleet})
    skipped = nightly_schedule(context)
    assert isinstance(skipped, dg.SkipReason) and "no request files for 2026-01-02" in skipped.skip_message
    write_requests(tmp_path, DATES[0], [ROW])                             # a day earlier does not count
    assert isinstance(nightly_schedule(context), dg.SkipReason)
    write_requests(tmp_path, DATES[1], [ROW])
    run = nightly_schedule(context)
    assert isinstance(run, dg.RunRequest) and run.partition_key == "2026-01-02"


def test_sensor_starts_each_complete_day_with_requests_and_no_generations(tmp_path):
    fleet = LorafleetResource(root=str(tmp_path))
    with dg.instance_for_test() as instance:
        def evaluate():
            return new_requests_sensor(dg.build_sensor_context(instance=instance, resources={"lorafleet": fleet}))

        assert isinstance(evaluate(), dg.SkipReason)
        today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        for day in [*DATES, today]:                                       # today is not complete yet
            write_requests(tmp_path, day, [ROW])
        assert [(r.partition_key, r.run_key) for r in evaluate()] == [(d, d) for d in DATES]
        instance.report_runless_asset_event(dg.AssetMaterialization("generations", partition=DATES[0]))
        assert [r.partition_key for r in evaluate()] == [DATES[1]]

