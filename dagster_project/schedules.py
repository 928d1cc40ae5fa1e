"""When the night runs: at 02:00 for the day before, and whenever a new day's request files appear."""
from datetime import timedelta

from dagster import (AssetSelection, RunRequest, ScheduleEvaluationContext, SensorEvaluationContext, SkipReason,
                     define_asset_job, schedule, sensor)

from .assets import generations
from .partitions import daily
from .resources import LorafleetResource

nightly_job = define_asset_job("nightly", selection=AssetSelection.all(),
                               description="requests -> inference_plan -> generations -> adapter_metrics, "
                                           "with their checks, for one day")


# Not build_schedule_from_partitioned_job: that one cannot skip a day that has no request files.
@schedule(job=nightly_job, cron_schedule="0 2 * * *", execution_timezone="UTC")
def nightly_schedule(context: ScheduleEvaluationContext, lorafleet: LorafleetResource):
    """Run yesterday's partition, or skip it, saying why, when nobody wrote requests for it."""
    day = (context.scheduled_execution_time - timedelta(days=1)).strftime("%Y-%m-%d")
    if day not in lorafleet.request_days():
        return SkipReason(f"no request files for {day} under {lorafleet.root}/requests/date={day}/")
    return RunRequest(partition_key=day)


@sensor(job=nightly_job, minimum_interval_seconds=60)
def new_requests_sensor(context: SensorEvaluationContext, lorafleet: LorafleetResource):
    """Start a run for each complete day that has request files and no generations yet."""
    done = context.instance.get_materialized_partitions(generations.key)
    days = [day for day in lorafleet.request_days() if daily.has_partition_key(day) and day not in done]
    if not days:
        return SkipReason("no new day with request files")
    # The run key is the day: the sensor starts a day once (a failed day is re-run from the UI).
    return [RunRequest(run_key=day, partition_key=day) for day in days]
