"""The host-side load benchmark runs on CPU with --tiny and reports every rank; no timing is asserted."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_loads_tiny_reports_every_rank(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.bench_loads", "--tiny", "--repeats", "1", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    data = json.loads((tmp_path / "bench_loads.json").read_text())
    assert data["shapes"] == "tiny" and [row["rank"] for row in data["rows"]] == [8, 16, 32, 64]
    for row in data["rows"]:
        assert row["bytes"] > 0 and row["readers"] == 2 and row["reader_speedup"] > 0
        for name in ("load_file_s", "load_file_clone_s", "host_s", "scatter_s", "one_reader_s", "n_readers_s"):
            median, low, high = row[name]
            assert 0 < low <= median <= high, (name, row[name])
        assert f"\n{row['rank']:>4} " in run.stdout
