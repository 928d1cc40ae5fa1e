"""Scored rows through the pipeline: validation of the new columns, one table with generation rows (every
result column present, null where not asked), the summary's prefill tokens, and a crashed run resumed without
redoing its scored rows."""
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.config import EngineConfig
from pipeline.cli import main
from pipeline.requests import parse_requests
from pipeline.results import ShardWriter
from pipeline.run import run_requests
from pipeline.schema import RESULT_SCHEMA, SCORING_COLUMNS

PROMPT = " ".join(f"w{i}" for i in range(1, 41))        # 41 tokens with <s>: two shareable pages of 16


def request_rows() -> list[dict]:
    rows = []
    for adapter in (None, "a1", "a2"):
        name = adapter or "base"
        rows += [{"request_id": f"{name}/q/{label}", "adapter_id": adapter, "prompt": PROMPT + " =",
                  "continuation": f" w{50 + i} w{60 + i}", "choice_group": "q", "choice_label": label, "gold": "B",
                  "logprobs": 2 if label == "A" else None, "task": "mc"} for i, label in enumerate("ABCD")]
        rows += [{"request_id": f"{name}/gen", "adapter_id": adapter, "prompt": "w1 w2 w3", "max_new_tokens": 4,
                  "logprobs": 3, "task": "gen"},
                 {"request_id": f"{name}/ppl", "adapter_id": adapter, "prompt": "", "continuation": "w7 w8 w9",
                  "task": "ppl"},
                 {"request_id": f"{name}/ids", "adapter_id": adapter, "prompt_token_ids": [1, 5, 6],
                  "continuation_token_ids": [7, 8], "task": "ppl"}]
    return rows


BAD = [({"continuation": " w5", "max_new_tokens": 3}, "both max_new_tokens and a continuation"),
       ({"continuation": ""}, "continuation is empty"),
       ({"continuation_token_ids": []}, "continuation is empty"),
       ({"continuation": "w5", "continuation_token_ids": [9]}, "give one of them"),
       ({"continuation_token_ids": [5, -1]}, "null or negative ids"),
       ({"logprobs": 21}, "logprobs = 21 is invalid: it must be an integer from 0 to 20"),
       ({"logprobs": -1, "continuation": " w5"}, "logprobs = -1 is invalid"),
       ({"prompt": None}, "prompt is null or empty")]        # an empty prompt is fine for scored rows only


def table(rows: list[dict]) -> pa.Table:
    """Every key of any row a column (from_pylist alone takes the first row's keys)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows])


def write(path, rows: list[dict]) -> None:
    pq.write_table(table(rows), path)


@pytest.mark.parametrize("fields, words", BAD)
def test_bad_scored_rows_fail_alone(fields, words):
    good = {"request_id": "ok", "prompt": "w1", "continuation": " w2", "logprobs": 20}
    parsed = parse_requests(table([good, {"request_id": "bad", "prompt": "w1", **fields}]), 8)
    assert [r.request_id for r in parsed.requests] == ["ok"] and parsed.requests[0].is_scored
    assert parsed.requests[0].continuation == " w2" and parsed.requests[0].logprobs == 20
    (rejected,) = parsed.rejected
    assert words in rejected.error


def config(fleet, **overrides) -> EngineConfig:
    return EngineConfig(model=str(fleet["model"]), adapters=str(fleet["adapters"]), cpu_pool_bytes=16 << 20,
                        **overrides)


def test_a_mixed_table_reads_as_one_table_with_every_column(tiny_fleet, tmp_path):
    write(tmp_path / "requests.parquet", request_rows())
    summary = run_requests(config(tiny_fleet), str(tmp_path / "requests.parquet"), str(tmp_path / "out"),
                           progress=False, rows_per_shard=5)
    assert (summary.rows_ok, summary.rows_failed) == (21, 0)
    shards = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(shards) == 5 and all(pq.read_schema(p).remove_metadata() == pq.read_schema(shards[0]).remove_metadata()
                                    for p in shards)     # shards of scored rows only, or of none, alike
    assert all(pq.read_schema(shards[0]).field(c).type == RESULT_SCHEMA.field(c).type for c in SCORING_COLUMNS)
    results = pl.read_parquet(f"{tmp_path}/out/*.parquet")
    by = {row["request_id"]: row for row in results.iter_rows(named=True)}
    choice, plain, gen, ppl = by["a1/q/A"], by["a1/q/B"], by["a1/gen"], by["base/ppl"]
    assert choice["finish_reason"] == "scored" and choice["output_text"] == " w50 w60"
    assert choice["continuation_tokens"] == 2 and len(choice["token_logprobs"]) == 2
    assert choice["continuation_logprob"] == pytest.approx(sum(choice["token_logprobs"]), abs=1e-4)
    assert [len(top) for top in choice["top_logprobs"]] == [2, 2] and set(choice["top_logprobs"][0][0]) == {
        "token_id", "token", "logprob"}
    assert plain["token_logprobs"] is None and plain["top_logprobs"] is None and plain["is_greedy"] is not None
    assert gen["finish_reason"] in ("stop", "length") and gen["continuation_logprob"] is None
    assert len(gen["token_logprobs"]) == gen["output_tokens"] == len(gen["top_logprobs"])
    assert ppl["prompt_tokens"] == 1 and ppl["continuation_tokens"] == 3     # the empty prompt is <s>
    assert by["a2/ids"]["output_token_ids"] == [7, 8] and by["a2/ids"]["output_text"] == "w3 w4"
    # one prompt for the four choices of each adapter: the summary says so
    record = json.loads(next((tmp_path / "out" / "_runs").glob("*/summary.json")).read_text())
    assert record["prefill_tokens_computed"] < record["prefill_tokens_requested"]
    assert record["scored_tokens"] == summary.scored_tokens == 3 * (4 * 2 + 3 + 2)
    assert record["output_tokens"] == sum(by[f"{name}/gen"]["output_tokens"] for name in ("base", "a1", "a2"))


def test_no_prefix_sharing_computes_every_requested_token(tiny_fleet, tmp_path, capsys):
    write(tmp_path / "requests.parquet", request_rows())
    args = ["run", "--model", str(tiny_fleet["model"]), "--adapters", str(tiny_fleet["adapters"]),
            "--requests", str(tmp_path / "requests.parquet"), "--no-progress"]
    assert main(args + ["--output", str(tmp_path / "shared")]) == 0
    shared = capsys.readouterr().out
    assert main(args + ["--output", str(tmp_path / "unshared"), "--no-prefix-sharing"]) == 0
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("prefill tokens"))
    computed, requested = (int(w.replace(",", "")) for w in line.split()[3:6:2])
    assert computed == requested and line not in shared
    a, b = (pl.read_parquet(f"{tmp_path}/{d}/*.parquet").sort("request_id") for d in ("shared", "unshared"))
    assert (a["continuation_logprob"] - b["continuation_logprob"]).abs().max() < 1e-5


def test_a_crashed_run_resumes_without_redoing_scored_rows(tiny_fleet, tmp_path, monkeypatch):
    write(tmp_path / "requests.parquet", request_rows())
    requests, out = str(tmp_path / "requests.parquet"), str(tmp_path / "out")
    clean = run_requests(config(tiny_fleet), requests, str(tmp_path / "clean"), progress=False)
    real_add, added = ShardWriter.add, []

    def crash_after_seven(writer, output):
        if len(added) == 7:
            raise RuntimeError("simulated crash")
        added.append(output.request_id)
        real_add(writer, output)

    monkeypatch.setattr(ShardWriter, "add", crash_after_seven)
    with pytest.raises(RuntimeError):
        run_requests(config(tiny_fleet), requests, out, run_id="first", progress=False, rows_per_shard=2)
    monkeypatch.undo()
    again = run_requests(config(tiny_fleet), requests, out, run_id="second", progress=False)
    assert again.rows_skipped == 7 and again.rows_ok == clean.rows_ok - 7
    results = pl.read_parquet(f"{out}/*.parquet").sort("request_id")
    assert results["request_id"].n_unique() == results.height == 21
    assert sorted(results.filter(pl.col("run_id") == "first")["request_id"]) == sorted(added)
    expected = pl.read_parquet(f"{tmp_path}/clean/*.parquet").sort("request_id")
    assert (results["continuation_logprob"] - expected["continuation_logprob"]).abs().max() < 1e-5
    assert results["is_greedy"].to_list() == expected["is_greedy"].to_list()


def test_result_schema_has_the_scoring_columns_always():
    assert [RESULT_SCHEMA.field(c).type for c in SCORING_COLUMNS] == [
        pa.float64(), pa.int32(), pa.bool_(), pa.list_(pa.float32()),
        pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])))]
