"""Hand-made deployments under a temp root: request tables, result shards (and, with the engine, weights)."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.layout import requests_url, results_url
from pipeline.schema import RESULT_SCHEMA

DATES = ["2026-01-01", "2026-01-02"]
ADAPTER_IDS = ["r8-qv", "r64-mlp-o"]   # two of the adapters of tests/conftest.py's llama_fleet


def write_requests(root, date: str, rows: list[dict], name: str = "part-0.parquet") -> Path:
    folder = Path(requests_url(str(root), date))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / name)
    return folder / name


def write_results(root, date: str, rows: list[dict], name: str = "part-000000.parquet") -> Path:
    """Result rows with the columns not given left null (a shard as the writer commits it)."""
    folder = Path(results_url(str(root), date))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), folder / name)
    return folder / name


def night_rows() -> list[dict]:
    """A night: six good rows over the two ADAPTER_IDS and the base model, then a duplicated id, a row with
    a bad adapter id and a row for an adapter that does not exist: 8 request ids, 2 of them error rows."""
    words = [f"w{i}" for i in range(1, 12)]
    rows = [{"request_id": f"r{i}", "adapter_id": [*ADAPTER_IDS, None][i % 3], "prompt": " ".join(words[i:i + 3]),
             "max_new_tokens": 3, "task": "reverse", "reference": " ".join(words[i:i + 3][::-1])}
            for i in range(6)]
    return rows + [{**rows[0], "prompt": "w9"}, {**rows[1], "request_id": "bad", "adapter_id": "not ok!"},
                   {**rows[2], "request_id": "ghost", "adapter_id": "ghost"}]
