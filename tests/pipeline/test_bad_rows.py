"""Every bad input of issue 4 in one request table, with good rows around it, through the CLI: each bad
row becomes one error row that says what is wrong, every other row completes; a table that cannot be a
request table is refused before any work with exit code 2 and one line naming the file and the column."""
import json
import pickle
import shutil

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

import engine.adapters
from pipeline.cli import main

class Unpickled:
    """A pickle that, if ever loaded, creates a marker folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.makedirs, (self.marker,)


def bad_adapters(root, good, outside, marker) -> None:
    """Adapter folders that must each fail their own rows (and names that reach real adapters if unchecked)."""
    def copy(name):
        shutil.copytree(good, root / name)
        return root / name

    def edit_config(name, **changes):
        path = copy(name) / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    shutil.copytree(good, outside / "a1")            # reachable as "../a1" if names were not checked
    copy("nest/a1")                                  # reachable as "nest/a1"
    copy("a" * 129)                                  # a valid folder, but the name is too long
    (copy("no-config") / "adapter_config.json").unlink()
    pickled = copy("pickle-only")
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(Unpickled(marker)))
    weights = copy("truncated") / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (copy("corrupt") / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    (copy("config-not-json") / "adapter_config.json").write_text("{not json")     # the planner reads it first
    edit_config("rank-not-int", r="x")
    weights = copy("wrong-shapes") / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()
    save_file(tensors, weights)
    edit_config("dora", use_dora=True)
    edit_config("embed-target", target_modules=["q_proj", "v_proj", "embed_tokens"])
    edit_config("lm-head-target", target_modules=["q_proj", "v_proj", "lm_head"])


# request_id -> (row fields, a word the error must contain)
BAD = {
    "adapter-missing": ({"adapter_id": "nope"}, "not found"),
    "adapter-dotdot": ({"adapter_id": "../a1"}, "adapter_id"),
    "adapter-absolute": ({"adapter_id": "/etc"}, "adapter_id"),
    "adapter-slash": ({"adapter_id": "nest/a1"}, "adapter_id"),
    "adapter-empty": ({"adapter_id": ""}, "adapter_id"),
    "adapter-too-long": ({"adapter_id": "a" * 129}, "adapter_id"),
    "adapter-no-config": ({"adapter_id": "no-config"}, "adapter_config.json"),
    "adapter-pickle": ({"adapter_id": "pickle-only"}, "never unpickled"),
    "adapter-truncated": ({"adapter_id": "truncated"}, "cannot be read"),
    "adapter-corrupt-1": ({"adapter_id": "corrupt"}, "cannot be read"),
    "adapter-corrupt-2": ({"adapter_id": "corrupt"}, "cannot be read"),
    "adapter-shapes": ({"adapter_id": "wrong-shapes"}, "fit the base"),
    "adapter-config-not-json": ({"adapter_id": "config-not-json"}, "cannot be read"),
    "adapter-rank-not-int": ({"adapter_id": "rank-not-int"}, "rank"),
    "adapter-dora": ({"adapter_id": "dora"}, "DoRA"),
    "adapter-embed": ({"adapter_id": "embed-target"}, "embed_tokens"),
    "adapter-lm-head": ({"adapter_id": "lm-head-target"}, "lm_head"),
    "prompt-null": ({"prompt": None}, "prompt"),
    "prompt-empty": ({"prompt": ""}, "prompt"),
    "prompt-too-long": ({"prompt": " ".join(["w1"] * 600)}, "context"),
    "ids-out-of-vocab": ({"prompt": None, "prompt_token_ids": [5, 100_000]}, "vocabulary"),
    "ids-negative": ({"prompt": None, "prompt_token_ids": [5, -3]}, "prompt_token_ids"),
    "ids-empty": ({"prompt": None, "prompt_token_ids": []}, "prompt_token_ids"),
    "max-new-tokens-0": ({"max_new_tokens": 0}, "max_new_tokens"),
    "temperature-negative": ({"temperature": -0.5}, "temperature"),
    "top-p-0": ({"top_p": 0.0}, "top_p"),
    "top-p-above-1": ({"top_p": 1.5}, "top_p"),
    "top-k-negative": ({"top_k": -1}, "top_k"),
    "stop-not-strings": ({"stop": ["w9", None]}, "stop"),
}


GOOD_KINDS = [  # varied good rows: base model and both adapters, text and token-id prompts, sampling settings
    {"adapter_id": None, "prompt": "w1 w2 w3"},
    {"adapter_id": "a1", "prompt": "w4 w5"},
    {"adapter_id": "a2", "prompt": "w6 w7 w8 w9", "temperature": 0.8, "seed": 3},
    {"adapter_id": "a1", "prompt": None, "prompt_token_ids": [5, 6, 7]},
    {"adapter_id": None, "prompt": "w10", "stop": ["w11"], "top_k": 5, "top_p": 0.9},
    {"adapter_id": "a2", "prompt": "w12 w13", "max_new_tokens": 2},
    {"adapter_id": "a1", "prompt": "w2 w3", "temperature": 1e-300},   # float32 logits / 1e-300 would be NaN
]
GOOD = [f"good-{i:02d}" for i in range(len(BAD) + 1)]


def request_rows() -> list[dict]:
    """good, bad, good, bad, ..., good; then a duplicate of good-01 and a row without a request_id."""
    rows = [{"request_id": GOOD[0], **GOOD_KINDS[0]}]
    for i, (request_id, (fields, _)) in enumerate(BAD.items(), start=1):
        rows.append({"request_id": request_id, "adapter_id": "a1", "prompt": "w1 w2", **fields})
        rows.append({"request_id": GOOD[i], **GOOD_KINDS[i % len(GOOD_KINDS)]})
    rows.append({"request_id": "good-01", "adapter_id": "a2", "prompt": "a duplicate"})
    rows.append({"request_id": None, "adapter_id": None, "prompt": "w3"})
    return [{**row, "note": f"note of {row['request_id']}"} for row in rows]


def write_table(path, rows: list[dict]) -> None:
    names = list(dict.fromkeys(n for row in rows for n in row))
    types = {"prompt_token_ids": pa.list_(pa.int64()), "stop": pa.list_(pa.string()), "max_new_tokens": pa.int32(),
             "temperature": pa.float64(), "top_p": pa.float64(), "top_k": pa.int32(), "seed": pa.int64()}
    pq.write_table(pa.table({n: pa.array([row.get(n) for row in rows], types.get(n)) for n in names}), path)


def test_each_bad_row_fails_alone(tiny_fleet, tmp_path, monkeypatch, caplog, capsys):
    adapters = tmp_path / "fleet" / "adapters"
    for name in ("a1", "a2"):
        shutil.copytree(tiny_fleet["adapters"] / name, adapters / name)
    marker = tmp_path / "UNPICKLED"
    bad_adapters(adapters, tiny_fleet["adapters"] / "a1", tmp_path / "fleet", marker)
    write_table(tmp_path / "requests.parquet", request_rows())
    reads = []
    real_read = engine.adapters.read_adapter
    monkeypatch.setattr(engine.adapters, "read_adapter", lambda root, adapter_id, *a, **k: (
        reads.append(adapter_id), real_read(root, adapter_id, *a, **k))[1])

    out = tmp_path / "out"
    code = main(["run", "--model", str(tiny_fleet["model"]), "--adapters", str(adapters),
                 "--requests", str(tmp_path / "requests.parquet"), "--output", str(out),
                 "--max-new-tokens", "4", "--no-progress"])
    assert code == 1                                             # some rows failed

    results = pl.read_parquet(f"{out}/**/*.parquet")
    by_id = {row["request_id"]: row for row in results.to_dicts()}
    assert results.height == len(GOOD) + len(BAD) + 1 == len(by_id)   # one row each; one without an id
    for request_id in GOOD:
        row = by_id[request_id]
        assert row["finish_reason"] in ("stop", "length") and row["error"] is None, row
        assert row["output_text"] is not None and row["output_tokens"] >= 1
        assert row["note"] == f"note of {request_id}"
    assert by_id["good-01"]["adapter_id"] == "a1"               # the first good-01, not the duplicate
    for request_id, (_, word) in BAD.items():
        row = by_id[request_id]
        assert row["finish_reason"] == "error" and row["output_text"] is None, row
        assert word.lower() in row["error"].lower(), (request_id, row["error"])
        assert row["note"] == f"note of {request_id}"
    assert "request_id" in by_id[None]["error"] and by_id[None]["finish_reason"] == "error"

    assert not marker.exists()                                   # the pickle was never loaded
    assert reads.count("corrupt") == 1                           # a bad adapter is tried once per run
    assert not {"../a1", "nest/a1", "a" * 129, "", "/etc"} & set(reads)
    summary = json.loads(next(out.glob("_runs/*/summary.json")).read_text())
    assert summary["duplicates"] == {"rows": 1, "ids": 1, "first": ["good-01"]} and summary["rows_ok"] == len(GOOD)
    assert summary["rows_failed"] == len(BAD) + 1
    assert "duplicate" in caplog.text and "'good-01'" in caplog.text
    assert f"failed {len(BAD) + 1}" in capsys.readouterr().out

    # Run again on the same output: every row, the one without a request_id included, is already there.
    assert main(["run", "--model", str(tiny_fleet["model"]), "--adapters", str(adapters),
                 "--requests", str(tmp_path / "requests.parquet"), "--output", str(out), "--no-progress"]) == 0
    assert pl.read_parquet(f"{out}/**/*.parquet").height == results.height
    assert f"skipped (already done) {results.height}" in capsys.readouterr().out


@pytest.mark.parametrize("columns, words", [
    ({"id": ["r1"], "prompt": ["w1"]}, ["'request_id'"]),
    ({"request_id": ["r1"], "text": ["w1"]}, ["'prompt'", "prompt_token_ids"]),
    ({"request_id": ["r1"], "prompt": ["w1"], "max_new_tokens": [1.5]}, ["'max_new_tokens'", "integer"]),
    ({"request_id": ["r1"], "prompt": ["w1"], "stop": [[1]]}, ["'stop'", "list of strings"]),
])
def test_table_that_is_not_a_request_table_is_refused(tiny_fleet, tmp_path, capsys, columns, words):
    path = tmp_path / "requests.parquet"
    pq.write_table(pa.table(columns), path)
    code = main(["run", "--model", str(tiny_fleet["model"]), "--requests", str(path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()                        # refused before any work


def test_not_parquet_exits_2_with_one_line_and_no_traceback(tiny_fleet, tmp_path, lorafleet):
    path = tmp_path / "requests.parquet"
    path.write_text("request_id,prompt\nr1,w1\n")
    proc = lorafleet("run", "--model", tiny_fleet["model"], "--requests", path, "--output", tmp_path / "o")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "Parquet" in lines[0], stderr
    assert "Traceback" not in stderr
