"""Hostile adapters through the CLI (issue 14): each fails its own rows, once per run, with a message that says
why; every other row completes; `lorafleet plan` sizes them in bounded time; summary.json reports the loads."""
import json
import os
import shutil

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

import engine.adapters
from pipeline.cli import main


def hostile_adapters(root, good, outside) -> dict[str, str]:
    """Adapter folders built to hurt; returns adapter id -> a word its rows' error must contain."""
    def copy(name, config=None, edit=None):
        shutil.copytree(good, root / name)
        if config:
            path = root / name / "adapter_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        if edit:
            path = root / name / "adapter_model.safetensors"
            save_file(edit(load_file(path)), path)

    def nan_in_b(tensors):
        name = next(k for k in sorted(tensors) if "lora_B" in k)
        tensors[name][0, 0] = float("nan")
        return tensors

    copy("nan-weights", edit=nan_in_b)
    copy("rank-1e8", config={"r": 10**8})
    copy("rank-0", config={"r": 0})
    copy("evil-regex", config={"target_modules": r"(.|..)*(?<![sdj])"})
    copy("int8", edit=lambda t: {k: (v * 100).to(torch.int8) for k, v in t.items()})
    shutil.copytree(good, outside / "escaped")
    os.symlink(outside / "escaped", root / "symlink-out")
    return {"nan-weights": "NaN or Inf", "rank-1e8": "max_lora_rank", "rank-0": "rank >= 1",
            "evil-regex": "takes too long", "int8": "floating point", "symlink-out": "outside the adapter root"}


def test_hostile_adapters_fail_their_rows_once_and_plan_stays_bounded(tiny_fleet, tmp_path, monkeypatch, capsys):
    adapters = tmp_path / "adapters"
    shutil.copytree(tiny_fleet["adapters"], adapters)
    (tmp_path / "outside").mkdir()
    expected = hostile_adapters(adapters, tiny_fleet["adapters"] / "a1", tmp_path / "outside")
    rows = [{"request_id": f"{adapter_id}-{i}", "adapter_id": adapter_id, "prompt": "w1 w2 w3"}
            for adapter_id in list(expected) + ["a1", "a2", None] for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "requests.parquet")
    args = ["--model", str(tiny_fleet["model"]), "--adapters", str(adapters),
            "--requests", str(tmp_path / "requests.parquet")]

    assert main(["plan"] + args) == 0                  # sized in bounded time: each counts one page
    capsys.readouterr()
    reads = []
    real_read = engine.adapters.read_adapter
    monkeypatch.setattr(engine.adapters, "read_adapter", lambda root, adapter_id, *a, **k: (
        reads.append(adapter_id), real_read(root, adapter_id, *a, **k))[1])
    out = tmp_path / "out"
    assert main(["run"] + args + ["--output", str(out), "--max-new-tokens", "3", "--no-progress"]) == 1

    by_id = {row["request_id"]: row for row in pl.read_parquet(f"{out}/*.parquet").to_dicts()}
    assert len(by_id) == len(rows)
    for row in by_id.values():
        word = expected.get(row["adapter_id"])
        if word is None:
            assert row["error"] is None and row["output_tokens"] >= 1, row
        else:
            assert row["finish_reason"] == "error" and word in row["error"], row
    assert all(reads.count(adapter_id) == 1 for adapter_id in expected)          # tried once per run
    summary = json.loads(next(out.glob("_runs/*/summary.json")).read_text())
    assert summary["adapter_loads"] == 2 and summary["adapter_bytes_read"] > 0
    assert summary["adapter_read_s"] > 0 and summary["adapter_load_wait_s"] >= 0
    assert summary["adapter_read_gb_per_s"] > 0
    assert "adapter reads:" in capsys.readouterr().out
