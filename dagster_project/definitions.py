"""The one Definitions of the project: `dagster dev -m dagster_project` loads it."""
from dagster import Definitions, in_process_executor

from .assets import adapter_metrics, generations, inference_plan, requests
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
    # The steps of a night form one chain, so one process per run: no interpreter start and torch import
    # per step. Runs of different days still run side by side, and the gpu pool serialises their engines.
    executor=in_process_executor,
)
