"""A deployment root with two nights of requests, on tests/conftest.py's tiny llama checkpoint and adapters."""
import pytest

from dagster_project.resources import LorafleetResource
from fleet_tables import DATES, night_rows, write_requests


@pytest.fixture
def lorafleet(tmp_path, llama_fleet) -> LorafleetResource:
    """The resource of a fresh root holding both nights' requests (2 of 8 rows fail: bound 0.3)."""
    root = tmp_path / "fleet"
    for date in DATES:
        write_requests(root, date, night_rows())
    return LorafleetResource(root=str(root), model=str(llama_fleet.model), adapters=str(llama_fleet.adapters),
                             max_error_rate=0.3)
