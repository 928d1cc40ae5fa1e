"""`lorafleet run` end to end on Parquet: oracle tokens on every row, error rows, exit codes, readers."""
import json
import subprocess
import sys

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from tests.oracle import load_oracle, mixed_requests, oracle_generate

NEW_TOKENS = 8


def write_requests(path, requests, extra_rows=()):
    rows = [{"request_id": r.request_id, "adapter_id": r.adapter_id, "prompt_token_ids": r.prompt_token_ids,
             "max_new_tokens": NEW_TOKENS, "task": f"task-{i % 3}"} for i, r in enumerate(requests)]
    rows += list(extra_rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        ("request_id", pa.string()), ("adapter_id", pa.string()), ("prompt_token_ids", pa.list_(pa.int32())),
        ("max_new_tokens", pa.int32()), ("task", pa.string())])), path)


def test_cli_run_matches_the_oracle_on_every_row(fleet, tmp_path):
    requests = mixed_requests(fleet.adapter_ids, 24, NEW_TOKENS, seed=9)
    missing = {"request_id": "ghost", "adapter_id": "does-not-exist", "prompt_token_ids": [5, 6, 7],
               "max_new_tokens": NEW_TOKENS, "task": "task-x"}
    write_requests(tmp_path / "requests.parquet", requests, [missing])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--model", str(fleet.model),
                           "--adapters", str(fleet.adapters), "--requests", str(tmp_path / "requests.parquet"),
                           "--output", str(out), "--max-active-adapters", "3", "--max-num-seqs", "8",
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr          # one row failed: exit 1
    assert "rows ok 24  failed 1" in proc.stdout and "adapters: 6 distinct" in proc.stdout

    results = pl.read_parquet(f"{out}/**/*.parquet")
    assert results.height == 25 and results["request_id"].n_unique() == 25
    ghost = results.filter(pl.col("request_id") == "ghost").row(0, named=True)
    assert ghost["finish_reason"] == "error" and "not found" in ghost["error"] and ghost["output_text"] is None
    expected = oracle_generate(load_oracle(fleet.model, fleet.adapters, fleet.adapter_ids), requests, NEW_TOKENS)
    by_id = {row["request_id"]: row for row in results.iter_rows(named=True)}
    for request, tokens in zip(requests, expected):
        row = by_id[request.request_id]
        assert row["output_token_ids"] == tokens, request.request_id
        assert row["error"] is None and row["base_model"] == str(fleet.model) and row["task"].startswith("task-")
        assert (row["adapter_sha256"] is None) == (request.adapter_id is None)

    sql = duckdb.sql(f"select adapter_id, count(*) n, sum(output_tokens) t from read_parquet('{out}/**/*.parquet') "
                     "group by adapter_id order by adapter_id nulls first").fetchall()
    assert sum(n for _, n, _ in sql) == 25 and sql[0][0] is None
    run_dirs = list((out / "_runs").iterdir())
    summary = json.loads((next(d for d in run_dirs if d.is_dir()) / "summary.json").read_text())
    assert summary["rows_ok"] == 24 and summary["rows_failed"] == 1 and summary["adapter_loads"] >= 5
    assert {p.name for p in out.iterdir()} <= {"_runs", "_tmp"} | {p.name for p in out.glob("part-*.parquet")}


def test_exit_codes_for_tables_that_cannot_run(llama_fleet, tmp_path, capsys):
    base = ["run", "--model", str(llama_fleet.model), "--adapters", str(llama_fleet.adapters),
            "--output", str(tmp_path / "out"), "--no-progress", "--requests"]
    (tmp_path / "notes.parquet").write_text("not parquet")
    pq.write_table(pa.table({"request_id": ["a"], "text": ["w1"]}), tmp_path / "no_prompt.parquet")
    for name, column in (("notes.parquet", None), ("no_prompt.parquet", "prompt")):
        assert main(base + [str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and (column is None or column in err[0])
        assert "Traceback" not in err[0]
    with pytest.raises(SystemExit) as usage:
        main(["run", "--model", "m"])
    assert usage.value.code == 2


def test_all_rows_ok_exits_0_and_plan_prints_waves(llama_fleet, tmp_path, capsys):
    requests = mixed_requests(llama_fleet.adapter_ids, 6, NEW_TOKENS, seed=2)
    write_requests(tmp_path / "r.parquet", requests)
    args = ["--model", str(llama_fleet.model), "--adapters", str(llama_fleet.adapters),
            "--requests", str(tmp_path / "r.parquet")]
    assert main(["plan"] + args) == 0
    assert "predicted adapter loads" in capsys.readouterr().out
    assert main(["run"] + args + ["--output", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "rows ok 6  failed 0" in capsys.readouterr().out


def test_base_model_name_fails_only_the_rows_of_adapters_trained_on_another_base(llama_fleet, tmp_path):
    import shutil
    for adapter_id, trained_on in (("ours", "meta-llama/Llama-tiny"), ("theirs", "Qwen/Qwen2-0.5B")):
        shutil.copytree(llama_fleet.adapters / "r8-qv", tmp_path / "adapters" / adapter_id)
        config_path = tmp_path / "adapters" / adapter_id / "adapter_config.json"
        config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()),
                                               base_model_name_or_path=trained_on)))
    requests = mixed_requests(["ours", "theirs"], 6, NEW_TOKENS, seed=2)
    write_requests(tmp_path / "requests.parquet", requests)
    assert main(["run", "--model", str(llama_fleet.model), "--adapters", str(tmp_path / "adapters"),
                 "--requests", str(tmp_path / "requests.parquet"), "--output", str(tmp_path / "out"),
                 "--base-model-name", "/models/llama-tiny", "--no-progress"]) == 1
    rows = pl.read_parquet(f"{tmp_path / 'out'}/*.parquet")
    failed = rows.filter(pl.col("finish_reason") == "error")
    assert set(failed["adapter_id"]) == {"theirs"} and failed.height == 2
    assert all("trained on 'Qwen/Qwen2-0.5B'" in e for e in failed["error"])
    assert rows.filter(pl.col("adapter_id").ne_missing("theirs"))["error"].null_count() == 4   # ours + base rows


def test_adapter_shards_run_at_once_into_one_output(llama_fleet, tmp_path):
    """Two processes, each one adapter shard (one GPU each in production), write one output together: every
    row once, the outputs of a whole run, each adapter in one shard only, the invalid row written once."""
    requests = mixed_requests(llama_fleet.adapter_ids, 16, NEW_TOKENS, seed=5)
    ghost = {"request_id": "ghost", "adapter_id": "does-not-exist", "prompt_token_ids": [5, 6],
             "max_new_tokens": NEW_TOKENS, "task": "t"}
    write_requests(tmp_path / "requests.parquet", requests, [ghost])
    args = ["--model", str(llama_fleet.model), "--adapters", str(llama_fleet.adapters),
            "--requests", str(tmp_path / "requests.parquet"), "--no-progress"]
    assert main(["run", *args, "--output", str(tmp_path / "whole")]) == 1
    sharded = tmp_path / "sharded"
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", *args, "--output", str(sharded),
                               "--adapter-shard", f"{i}/2", "--run-id", "night"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 1], outs   # the invalid row goes with shard 0

    columns = ["request_id", "adapter_id", "output_token_ids", "finish_reason", "error"]
    whole = pl.read_parquet(f"{tmp_path / 'whole'}/*.parquet").select(columns).sort("request_id")
    together = pl.read_parquet(f"{sharded}/*.parquet").select(columns).sort("request_id")
    assert together.height == 17 and together.to_dicts() == whole.to_dicts()
    adapters_of = [set(pl.read_parquet(f"{sharded}/part-s{i}of2-*.parquet")["adapter_id"].drop_nulls())
                   for i in range(2)]
    assert adapters_of[0] and adapters_of[1] and not adapters_of[0] & adapters_of[1]
    summaries = [json.loads((sharded / "_runs" / "night" / f"s{i}of2" / "summary.json").read_text()) for i in range(2)]
    assert sum(s["rows_ok"] + s["rows_failed"] for s in summaries) == 17
    assert not list((sharded / "_runs").glob("LOCK*"))                    # both locks released
    # A rerun of one shard finds its rows done
    assert main(["run", *args, "--output", str(sharded), "--adapter-shard", "1/2"]) == 0
    assert pl.read_parquet(f"{sharded}/*.parquet").height == 17
