"""Result shards (committed atomically, numbered on, one table to Polars and DuckDB) and the output lock."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.storage
from engine.request import RequestOutput
from pipeline.requests import PassThrough
from pipeline.results import OutputUnavailable, OutputWriteError, ResultStore, ShardWriter, output_lock, write_run_record

REPO = Path(__file__).resolve().parents[2]


def output(i: int, error: bool = False) -> RequestOutput:
    if error:
        return RequestOutput(f"r{i}", "bad/x", None, [], 0, 0, "error", "adapter_id 'bad/x' is not a plain name")
    return RequestOutput(f"r{i}", f"a{i % 2}", f"w{i} w{i + 1}", [i, i + 1], 3, 2, "length", None, "ab" * 32)


def shard_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_file())


def test_shards_commit_by_rows_and_number_on_after_existing(tmp_path):
    store = ResultStore(str(tmp_path))
    with ShardWriter(store, "run1", "base", rows_per_shard=2) as writer:
        for i in range(3):
            writer.add(output(i))
        assert shard_names(tmp_path) == ["part-000000.parquet"]     # committed while the run goes
        for i in range(3, 5):
            writer.add(output(i))
        assert shard_names(tmp_path) == ["part-000000.parquet", "part-000001.parquet"]
    assert shard_names(tmp_path) == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert writer.rows_written == 5
    assert store.committed_ids() == {f"r{i}" for i in range(5)}
    assert store.next_shard_index() == 3

    with ShardWriter(ResultStore(str(tmp_path)), "run2", "base") as writer:
        writer.add(output(5))
    assert shard_names(tmp_path)[-1] == "part-000003.parquet"
    assert ResultStore(str(tmp_path)).committed_ids() == {f"r{i}" for i in range(6)}


def test_shard_commits_when_oldest_row_has_waited(tmp_path):
    store = ResultStore(str(tmp_path))
    writer = ShardWriter(store, "run1", "base", rows_per_shard=100, seconds_per_shard=0.2)
    writer.add(output(0))
    assert store.committed_ids() == set()
    time.sleep(0.25)
    writer.add(output(1))
    assert store.committed_ids() == {"r0", "r1"}


def test_rows_are_committed_when_the_run_fails(tmp_path):
    store = ResultStore(str(tmp_path))
    with pytest.raises(RuntimeError, match="device lost"):
        with ShardWriter(store, "run1", "base", rows_per_shard=100) as writer:
            writer.add(output(0))
            writer.add(output(1, error=True))
            raise RuntimeError("device lost")
    assert store.committed_ids() == {"r0", "r1"}


def test_output_reads_as_one_table(tmp_path):
    out = tmp_path / "results"
    extra = pa.table({"reference": ["w9", None], "weight": pa.array([3, None], pa.int16()),
                      "when": pa.array([datetime(2026, 1, 2, tzinfo=timezone.utc), None], pa.timestamp("ms", "UTC"))})
    store = ResultStore(str(out))
    with ShardWriter(store, "run1", "models/tiny", PassThrough(extra, {"r0": 0, "r1": 1}), rows_per_shard=1) as writer:
        writer.add(output(0))
        writer.add(output(1, error=True))
    write_run_record(str(out), "run1", "summary.json", json.dumps({"rows_ok": 1}))
    write_run_record(str(out), "run1", "run.log", b"log line\n")
    (out / "_tmp" / "part-000009.parquet.0123.tmp").write_bytes(b"PAR1 half a shard")  # a crashed write

    frame = pl.read_parquet(f"{out}/**/*.parquet").sort("request_id")
    assert frame.height == 2
    assert frame.columns[:17] == ["request_id", "adapter_id", "output_text", "output_token_ids", "prompt_tokens",
                                  "output_tokens", "finish_reason", "error", "base_model", "adapter_sha256",
                                  "continuation_logprob", "continuation_tokens", "is_greedy", "token_logprobs",
                                  "top_logprobs", "run_id", "completed_at"]
    assert frame.columns[17:] == ["reference", "weight", "when"]
    ok, failed = frame.to_dicts()
    assert ok["output_token_ids"] == [0, 1] and ok["finish_reason"] == "length" and ok["error"] is None
    assert ok["reference"] == "w9" and ok["weight"] == 3 and ok["base_model"] == "models/tiny"
    assert ok["adapter_sha256"] == "ab" * 32 and ok["run_id"] == "run1"
    assert failed["finish_reason"] == "error" and failed["output_text"] is None and "plain name" in failed["error"]
    assert abs(ok["completed_at"] - datetime.now(timezone.utc)) < timedelta(minutes=1)

    schema = pq.read_schema(out / "part-000000.parquet")
    assert schema.field("output_token_ids").type == pa.list_(pa.int32())
    assert schema.field("prompt_tokens").type == pa.int32()
    assert schema.field("completed_at").type == pa.timestamp("us", "UTC")
    assert schema.field("weight").type == pa.int16()                 # extra columns keep their own types

    (count,), = duckdb.sql(f"select count(*) from read_parquet('{out}/**/*.parquet')").fetchall()
    assert count == 2
    assert json.loads((out / "_runs" / "run1" / "summary.json").read_text()) == {"rows_ok": 1}
    with pytest.raises(ValueError, match="must not be Parquet"):
        write_run_record(str(out), "run1", "plan.parquet", b"")


def test_failed_write_leaves_no_shard_and_keeps_the_rows(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path))
    writer = ShardWriter(store, "run1", "base", rows_per_shard=100)
    writer.add(output(0))

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pipeline.storage.os, "fsync", disk_full)
    with pytest.raises(OutputWriteError, match="No space left on device") as info:
        writer.commit()
    assert str(info.value) == f"cannot write {tmp_path}: No space left on device"   # the output and the cause
    assert list(tmp_path.rglob("*part-*")) == []                       # neither a shard nor a temp file
    monkeypatch.undo()
    writer.commit()
    assert store.committed_ids() == {"r0"} and writer.rows_written == 1


def test_store_on_memory_filesystem():
    url = "memory://lorafleet-test-results"
    store = ResultStore(url)
    assert store.committed_ids() == set() and store.next_shard_index() == 0
    with ShardWriter(store, "run1", "base", rows_per_shard=2) as writer:
        for i in range(3):
            writer.add(output(i))
    with output_lock(url):
        write_run_record(url, "run1", "summary.json", "{}")
    assert store.committed_ids() == {"r0", "r1", "r2"} and store.next_shard_index() == 2
    assert sorted(p.rsplit("/", 1)[-1] for p in store.shard_paths()) == ["part-000000.parquet", "part-000001.parquet"]
    store.fs.rm(store.root, recursive=True)


# -- the output lock ---------------------------------------------------------------------------------------

HOLD_LOCK = "import sys, time\nfrom pipeline.results import output_lock\nwith output_lock(sys.argv[1]):\n" \
            "    print('held', flush=True)\n    time.sleep(120)\n"


def test_second_run_refused_while_first_lives_then_taken_over_when_it_dies(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputUnavailable) as info:
            with output_lock(str(tmp_path)):
                pass
        message = str(info.value)
        assert str(tmp_path) in message and f"pid {holder.pid}" in message and socket.gethostname() in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="pipeline.results"):
        with output_lock(str(tmp_path)) as held:
            assert held["pid"] == os.getpid()
    assert "stale" in caplog.text and str(holder.pid) in caplog.text
    assert not (tmp_path / "_runs" / "LOCK").exists()                 # released on exit


def test_lock_of_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path):
    lock = tmp_path / "_runs" / "LOCK"
    lock.parent.mkdir()
    other = {"host": "gpu-node-7", "pid": 1, "started": "2026-11-22T03:00:00+00:00", "token": "t"}
    lock.write_text(json.dumps({**other, "heartbeat": time.time()}))
    with pytest.raises(OutputUnavailable, match="gpu-node-7"):
        with output_lock(str(tmp_path), stale_after_s=60):
            pass
    lock.write_text(json.dumps({**other, "heartbeat": time.time() - 61}))
    with output_lock(str(tmp_path), stale_after_s=60) as held:
        assert json.loads(lock.read_text())["token"] == held["token"]


def test_heartbeat_is_refreshed_and_nested_lock_refused(tmp_path):
    lock = tmp_path / "_runs" / "LOCK"
    with output_lock(str(tmp_path), heartbeat_s=0.05):
        first = json.loads(lock.read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lock.read_text())["heartbeat"] > first
        with pytest.raises(OutputUnavailable):                              # same process, still alive: refused
            with output_lock(str(tmp_path)):
                pass
    assert not lock.exists()


def test_shards_of_one_split_lock_side_by_side_and_other_splits_are_refused(tmp_path):
    url = str(tmp_path)
    with output_lock(url, tag="s0of2"), output_lock(url, tag="s1of2"):          # one split: side by side
        for tag in ("", "s0of3"):                                              # the whole night, another split
            with pytest.raises(OutputUnavailable, match="split another way"):
                with output_lock(url, tag=tag):
                    pass
        with pytest.raises(OutputUnavailable, match="being written"):               # the same shard twice
            with output_lock(url, tag="s1of2"):
                pass
    with output_lock(url):
        with pytest.raises(OutputUnavailable, match="split another way"):
            with output_lock(url, tag="s0of2"):
                pass
    assert not list((tmp_path / "_runs").glob("LOCK*"))


def test_cli_refuses_a_second_run_on_the_same_output(tmp_path, capsys):
    from pipeline.cli import main
    pq.write_table(pa.table({"request_id": ["r1"], "prompt": ["w1"]}), tmp_path / "requests.parquet")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["run", "--model", str(tmp_path / "model"), "--requests", str(tmp_path / "requests.parquet"),
                     "--output", str(out), "--no-progress"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "another run" in err and f"pid {holder.pid}" in err
    assert list(out.glob("part-*")) == []


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputUnavailable, match="cannot write"):
        with output_lock(str(tmp_path / "file" / "out")):
            pass
