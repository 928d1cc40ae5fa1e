"""A tiny base checkpoint and two adapters (built once), and a deployment root with two nights of requests."""
import pytest

from dagster_project.resources import LorafleetResource
from fleet_tables import DATES, night_rows, write_requests
from tests.checkpoints import build_adapter, build_checkpoint


@pytest.fixture(scope="session")
def fleet_weights(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("weights")
    build_checkpoint(root / "model")
    build_adapter(root / "adapters" / "a0", root / "model", rank=4, seed=1)
    build_adapter(root / "adapters" / "a1", root / "model", rank=8, seed=2,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    return {"model": str(root / "model"), "adapters": str(root / "adapters")}


@pytest.fixture
def fleet(tmp_path, fleet_weights) -> LorafleetResource:
    """The resource of a fresh root holding both nights' requests (2 of 8 rows fail: bound 0.3)."""
    root = tmp_path / "fleet"
    for date in DATES:
        write_requests(root, date, night_rows())
    return LorafleetResource(root=str(root), max_error_rate=0.3, **fleet_weights)
