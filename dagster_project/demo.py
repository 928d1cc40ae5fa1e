"""`make demo`: pipeline.demo's fleet and nights, each night materialized by Dagster's `nightly` job (its checks
included) into the instance `make ui` opens, so the UI shows the nights' runs, metadata and checks, and the
last night's failed `no_regressions`.

    python -m dagster_project.demo [--root demo_data] [--size small|full]
"""
import sys
from collections.abc import Callable
from pathlib import Path

from dagster import DagsterInstance

from pipeline.demo import nights

from .assets import generations
from .definitions import defs
from .resources import LorafleetResource
from .ui import dagster_home, prepare_home

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}   # the demo prints its own lines


def dagster_nights(root: str, home: Path | None = None) -> Callable[[str], str]:
    """A demo `run_night` that materializes the night's partition into the instance at `home` (default: the
    one `make ui` opens)."""
    instance = DagsterInstance.from_config(str(prepare_home(home or dagster_home())))
    job = defs.resolve_job_def("nightly")
    fleet = LorafleetResource(root=root, device="cpu", dtype="float32")

    def run_night(date: str) -> str:
        result = job.execute_in_process(run_config=QUIET, instance=instance, partition_key=date,
                                        resources={"lorafleet": fleet})
        [materialized] = result.asset_materializations_for_node(generations.node_def.name)
        run = {k: v.value for k, v in materialized.metadata.items()}
        checks = ", ".join(f"{c.check_name} {'passed' if c.passed else 'FAILED'}"
                           for c in result.get_asset_check_evaluations())
        return (f"{run['rows_ok']} ok, {run['rows_failed']} failed, {run['output_tokens_per_s']:,.0f} output tokens/s;"
                f" checks: {checks}")
    return run_night


def main(argv: list[str] | None = None) -> None:
    nights.main(argv, night_runner=dagster_nights, prog="python -m dagster_project.demo")


if __name__ == "__main__":
    main(sys.argv[1:])
