"""The one Definitions of the project: `dagster dev -m dagster_project` loads it."""
from dagster import Definitions, in_process_executor, multiprocess_executor

from .assets import ADAPTER_SHARDS, adapter_metrics, generations, inference_plan, requests
from .checks import error_rate_under_bound, every_request_has_one_result, no_regressions
from .resources import LorafleetResource
from .schedules import new_requests_sensor, nightly_job, nightly_schedule

defs = Definitions(
    assets=[requests, inference_plan, generations, adapter_metrics],
    asset_checks=[every_request_has_one_result, error_rate_under_bound, no_regressions],
    jobs=[nightly_job],
    schedules=[nightly_schedule],
    sensors=[new_requests_sensor],
    resources={"lorafleet": LorafleetResource.from_env()},
    # A night with one adapter shard is one chain of steps, so one process per run: no interpreter start and
    # torch import per step. With more, each shard's step needs its own process (its own GPU) to run at once.
    # Runs of different days run side by side either way; the gpu-<i> pools serialise their engines.
    executor=in_process_executor if len(ADAPTER_SHARDS) == 1 else multiprocess_executor,
)
