"""Runs that cannot do what was meant are refused up front, exit 2 with one line, and leave the output as they
found it: an adapter root that is missing, mistyped or holds none of the named adapters; a wrong --model."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main

ROWS = [{"request_id": f"r{i}", "adapter_id": ["a1", "a2", None][i % 3], "prompt": "w1 w2 w3", "max_new_tokens": 2}
        for i in range(9)]


@pytest.fixture
def requests_file(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "requests.parquet")
    return tmp_path / "requests.parquet"


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorafleet: error: "), err
    return err[0]


@pytest.mark.parametrize("adapters, says", [
    ("adaptrs", "does not exist"),            # a typo
    ("model", "holds none of the 2 adapters (a1, a2)"),   # an existing folder, not the adapter root
    (None, "no adapter root was given"),
])
def test_an_adapter_root_without_the_named_adapters_refuses_run_and_plan(tiny_fleet, requests_file, tmp_path, capsys,
                                                                         adapters, says):
    root = ["--adapters", str(tiny_fleet["model"].parent / adapters)] if adapters else []
    args = ["--model", str(tiny_fleet["model"]), *root, "--requests", str(requests_file)]
    out = tmp_path / "out"
    for argv in (["run", *args, "--output", str(out), "--no-progress"], ["plan", *args]):
        assert says in refused(capsys, argv)
    assert not out.exists()


def test_base_model_rows_need_no_adapter_root(tiny_fleet, tmp_path, capsys):
    pq.write_table(pa.Table.from_pylist([dict(r, adapter_id=None) for r in ROWS]), tmp_path / "base.parquet")
    assert main(["run", "--model", str(tiny_fleet["model"]), "--adapters", str(tmp_path / "nowhere"),
                 "--requests", str(tmp_path / "base.parquet"), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "rows ok 9  failed 0" in capsys.readouterr().out


def test_a_wrong_model_leaves_the_output_as_it_found_it(tiny_fleet, requests_file, tmp_path, capsys):
    args = ["run", "--model", str(tmp_path / "no-model"), "--adapters", str(tiny_fleet["adapters"]),
            "--requests", str(requests_file), "--no-progress", "--output"]
    assert "cannot load model" in refused(capsys, [*args, str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("kept")
    refused(capsys, [*args, str(existing)])
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
