"""The request/result layer against a real S3 protocol server (moto, on 127.0.0.1)."""
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.request import RequestOutput
from pipeline.requests import parse_requests, read_request_table
from pipeline.results import OutputUnavailable, ResultStore, ShardWriter, output_lock, write_run_record
from pipeline.schema import TableError
from pipeline.storage import create_exclusive, filesystem

pytestmark = pytest.mark.e2e


def put_table(fs, path: str, columns: dict) -> None:
    with fs.open(path, "wb") as f:
        pq.write_table(pa.table(columns), f)


def round_trip(bucket: str, storage_options: dict | None) -> None:
    """Requests in, shards out, lock and run record, all on s3:// URLs."""
    fs, _ = filesystem(f"s3://{bucket}", storage_options)
    put_table(fs, f"{bucket}/requests/date=2026-11-22/a.parquet",
              {"request_id": ["r1", "r2"], "prompt": ["w1 w2", ""], "reference": ["w3", "w4"]})
    put_table(fs, f"{bucket}/requests/date=2026-11-22/b.parquet",
              {"request_id": ["r3"], "prompt_token_ids": [[5, 6]], "reference": ["w5"]})
    fs.pipe_file(f"{bucket}/requests/date=2026-11-22/_SUCCESS", b"")

    table = read_request_table(f"s3://{bucket}/requests/date=2026-11-22", storage_options)
    parsed = parse_requests(table, 8)
    assert [r.request_id for r in parsed.requests] == ["r1", "r3"]
    assert [o.request_id for o in parsed.rejected] == ["r2"]

    out = f"s3://{bucket}/results/date=2026-11-22"
    store = ResultStore(out, storage_options)
    with output_lock(out, storage_options) as held:
        assert json.loads(fs.cat_file(f"{bucket}/results/date=2026-11-22/_runs/LOCK"))["token"] == held["token"]
        with pytest.raises(OutputUnavailable, match="being written by another run"):
            with output_lock(out, storage_options):
                pass
        with ShardWriter(store, "run1", "s3://models/tiny", parsed.pass_through, rows_per_shard=2) as writer:
            for request in parsed.requests:
                writer.add(RequestOutput(request.request_id, None, "w7", [7], 2, 1, "length"))
            for rejected in parsed.rejected:
                writer.add(rejected)
        write_run_record(out, "run1", "summary.json", json.dumps({"rows_ok": 2}), storage_options)
    assert not fs.exists(f"{bucket}/results/date=2026-11-22/_runs/LOCK")

    fresh = ResultStore(out, storage_options)
    assert fresh.committed_ids() == {"r1", "r2", "r3"} and fresh.next_shard_index() == 2
    keys = sorted(p.split("date=2026-11-22/", 1)[1] for p in fs.find(f"{bucket}/results"))
    assert keys == ["_runs/run1/summary.json", "part-000000.parquet", "part-000001.parquet"]  # no temp objects
    rows = pa.concat_tables([pq.read_table(fs.open(p)) for p in fresh.shard_paths()]).to_pylist()
    assert {r["request_id"]: (r["finish_reason"], r["reference"]) for r in rows} == {
        "r1": ("length", "w3"), "r3": ("length", "w5"), "r2": ("error", "w4")}


def test_round_trip_with_endpoint_in_storage_options(s3_bucket):
    bucket, storage_options = s3_bucket
    round_trip(bucket, storage_options)


def test_round_trip_with_endpoint_in_environment(s3_bucket, s3_endpoint, monkeypatch):
    bucket, _ = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    round_trip(bucket, None)


def test_exclusive_create_is_conditional_on_s3(s3_bucket):
    bucket, storage_options = s3_bucket
    fs, _ = filesystem(f"s3://{bucket}", storage_options)
    create_exclusive(fs, f"{bucket}/x/LOCK", b"first")
    with pytest.raises(FileExistsError):
        create_exclusive(fs, f"{bucket}/x/LOCK", b"second")
    assert fs.cat_file(f"{bucket}/x/LOCK") == b"first"


def test_unreadable_table_on_s3_names_the_object(s3_bucket):
    bucket, storage_options = s3_bucket
    fs, _ = filesystem(f"s3://{bucket}", storage_options)
    fs.pipe_file(f"{bucket}/requests/t.parquet", b"request_id,prompt\nr1,w1\n")
    with pytest.raises(TableError, match=f"s3://{bucket}/requests/t.parquet: not a readable Parquet file"):
        read_request_table(f"s3://{bucket}/requests/t.parquet", storage_options)


def test_cli_run_with_everything_on_s3(s3_bucket, s3_endpoint, tiny_fleet, lorafleet):
    """Model, adapters, requests and output all on s3://; the endpoint given with --storage-option."""
    bucket, storage_options = s3_bucket
    fs, _ = filesystem(f"s3://{bucket}", storage_options)
    fs.put(str(tiny_fleet["model"]), f"{bucket}/models/tiny", recursive=True)
    fs.put(str(tiny_fleet["adapters"]), f"{bucket}/adapters", recursive=True)
    put_table(fs, f"{bucket}/requests/t.parquet", {
        "request_id": ["r0", "r1", "r2", "r3"], "adapter_id": [None, "a1", "a2", "missing"],
        "prompt": ["w1 w2", "w3 w4 w5", "w6", "w7"], "max_new_tokens": [3, 4, 2, 3], "task": ["x", "y", "z", "w"]})

    proc = lorafleet("run", "--model", f"s3://{bucket}/models/tiny", "--adapters", f"s3://{bucket}/adapters",
                     "--requests", f"s3://{bucket}/requests/t.parquet", "--output", f"s3://{bucket}/results",
                     "--storage-option", f"endpoint_url={s3_endpoint}", "--no-progress")
    stdout, stderr = proc.communicate(timeout=400)
    assert proc.returncode == 1, stderr                          # the row naming a missing adapter failed

    import polars as pl
    frame = pl.read_parquet(f"s3://{bucket}/results/**/*.parquet", storage_options={
        "aws_endpoint_url": s3_endpoint, "aws_allow_http": "true", "aws_region": "us-east-1",
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}).sort("request_id")
    rows = {r["request_id"]: r for r in frame.to_dicts()}
    assert sorted(rows) == ["r0", "r1", "r2", "r3"]
    for request_id in ("r0", "r1", "r2"):
        assert rows[request_id]["finish_reason"] in ("stop", "length") and rows[request_id]["output_tokens"] >= 1
        assert rows[request_id]["base_model"] == f"s3://{bucket}/models/tiny"
    assert rows["r1"]["adapter_sha256"] == hashlib.sha256(
        (tiny_fleet["adapters"] / "a1" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert rows["r3"]["finish_reason"] == "error" and "missing" in rows["r3"]["error"]
    assert [rows[r]["task"] for r in sorted(rows)] == ["x", "y", "z", "w"]
    assert len(fs.glob(f"{bucket}/results/_runs/*/summary.json")) == 1
    assert not fs.exists(f"{bucket}/results/_runs/LOCK")
