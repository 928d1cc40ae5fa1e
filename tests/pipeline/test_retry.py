"""`--retry-errors`: the output's error rows run again and their new rows supersede the old ones, exactly
once, even when the retry crashes half-way; a broken adapter is one warning with its row count."""
import logging
import shutil
from datetime import datetime, timedelta, timezone

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.retry
import pipeline.run
from engine.config import EngineConfig
from pipeline.cli import main
from pipeline.results import ResultStore
from pipeline.retry import read_committed, supersede
from pipeline.schema import RESULT_SCHEMA

ROWS = [{"request_id": f"r{i}", "adapter_id": ["a1", "late", None][i % 3], "prompt": "w1 w2 w3", "max_new_tokens": 2}
        for i in range(12)]
ROWS.append({"request_id": "bad", "adapter_id": "not ok!", "prompt": "w1", "max_new_tokens": 2})


@pytest.fixture
def night(tiny_fleet, tmp_path):
    """Requests for a1, the base model, and `late`: an adapter not published yet (copied from a1 by publish())."""
    adapters = tmp_path / "adapters"
    shutil.copytree(tiny_fleet["adapters"] / "a1", adapters / "a1")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "requests.parquet")

    class Night:
        out = tmp_path / "out"
        config = EngineConfig(model=str(tiny_fleet["model"]), adapters=str(adapters), max_num_seqs=4)
        requests = str(tmp_path / "requests.parquet")

        def run(self, retry_errors=False, **kwargs):
            return pipeline.run.run_requests(self.config, self.requests, str(self.out), progress=False,
                                             retry_errors=retry_errors, rows_per_shard=3, **kwargs)

        @staticmethod
        def publish():
            shutil.copytree(adapters / "a1", adapters / "late")

        def results(self) -> pl.DataFrame:
            return pl.read_parquet(f"{self.out}/*.parquet")
    return Night()


def one_row_each(results: pl.DataFrame) -> bool:
    return sorted(results["request_id"].to_list()) == sorted(r["request_id"] for r in ROWS)


def test_failed_rows_warn_once_per_adapter_and_a_retry_supersedes_them(night, caplog, capsys):
    args = ["run", "--model", night.config.model, "--adapters", night.config.adapters, "--requests", night.requests,
            "--output", str(night.out), "--no-progress", "--rows-per-shard", "3"]
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        assert main(args) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "late" in w] == ["4 rows of adapter 'late' failed: adapter 'late' not found under "
                                                    f"{night.config.adapters}"]
    assert len(warnings) == 2                                   # and one for the invalid row
    first = night.results()
    assert one_row_each(first) and first.filter(pl.col("adapter_id") == "late")["finish_reason"].to_list() == \
        ["error"] * 4

    night.publish()
    capsys.readouterr()
    assert main(args) == 0                                      # error rows count as done...
    assert "rows ok 0  failed 0  skipped (already done) 13" in capsys.readouterr().out
    assert main([*args, "--retry-errors"]) == 1                 # ...until retried; the invalid row fails again
    assert "rows ok 4  failed 1  skipped (already done) 8  retried 5" in capsys.readouterr().out

    final = night.results()
    assert one_row_each(final)                                  # one table, one row per request
    assert final.filter(pl.col("finish_reason") == "error")["request_id"].to_list() == ["bad"]
    late = final.filter(pl.col("adapter_id") == "late")
    assert late["error"].null_count() == 4 and late["output_tokens"].min() > 0
    unchanged = ["request_id", "output_token_ids", "run_id", "completed_at"]
    kept = first.filter(pl.col("adapter_id").ne_missing("late") & (pl.col("request_id") != "bad"))
    assert final.join(kept.select(unchanged), on=unchanged, how="semi").height == 8   # the other rows as they were


def test_a_retry_that_crashed_before_superseding_converges_on_the_next_run(night, monkeypatch):
    assert night.run().rows_failed == 5
    night.publish()

    def crash(*args):
        raise RuntimeError("killed after committing the new rows")
    monkeypatch.setattr(pipeline.run, "supersede", crash)
    with pytest.raises(RuntimeError, match="killed"):
        night.run(retry_errors=True)
    assert night.results().height == 13 + 5                     # old and new rows of the retried requests
    monkeypatch.undo()

    resumed = night.run()                                       # with or without --retry-errors
    assert resumed.rows_ok + resumed.rows_failed == 0 and resumed.rows_retried == 0
    final = night.results()
    assert one_row_each(final)
    assert final.filter(pl.col("adapter_id") == "late")["finish_reason"].to_list() == ["length"] * 4


def write_shard(store: ResultStore, index: int, rows: list[tuple[str, str, int]]) -> None:
    """Rows (request_id, finish_reason, minutes after midnight)."""
    day = datetime(2026, 1, 1, tzinfo=timezone.utc)
    table = pa.Table.from_pylist([{"request_id": rid, "finish_reason": reason, "output_tokens": minute,
                                   "completed_at": day + timedelta(minutes=minute)} for rid, reason, minute in rows],
                                 schema=RESULT_SCHEMA)
    store.fs.makedirs(store.root, exist_ok=True)
    pq.write_table(table, store.shard_path(index))


def test_supersede_crashing_between_shard_rewrites_converges_when_run_again(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path / "out"))
    write_shard(store, 0, [("a", "error", 0), ("b", "stop", 1), ("c", "error", 2)])
    write_shard(store, 1, [("d", "error", 3), ("e", "stop", 4)])
    write_shard(store, 2, [("a", "stop", 10), ("d", "error", 11)])     # a retried ok, d failed again
    write_shard(store, 3, [("c", "length", 12)])
    committed = read_committed(store, retry_errors=True)
    assert (committed.done, committed.retried, committed.duplicated) == ({"a", "b", "c", "e"}, {"d"}, {"a", "c", "d"})

    publish, calls = pipeline.retry.publish, []

    def crash_on_second(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk gone")
        publish(*args)
    monkeypatch.setattr(pipeline.retry, "publish", crash_on_second)
    with pytest.raises(OSError):
        supersede(store, committed.duplicated, logging.getLogger("test"))
    monkeypatch.undo()
    assert supersede(store, committed.duplicated, logging.getLogger("test")) == 1   # what the crash left
    rows = pl.read_parquet(f"{store.root}/*.parquet").select("request_id", "finish_reason", "output_tokens")
    assert sorted(rows.rows()) == [("a", "stop", 10), ("b", "stop", 1), ("c", "length", 12), ("d", "error", 11),
                                   ("e", "stop", 4)]
    assert supersede(store, {"a", "b", "c", "d", "e"}, logging.getLogger("test")) == 0
