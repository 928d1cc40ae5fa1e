"""A run killed with SIGKILL after its first committed shard, run again, ends with every request exactly
once and the same outputs as a run that was never interrupted (greedy and seeded sampling alike)."""
import json
import random
import signal
import time

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e

COMPARED = ["request_id", "adapter_id", "output_text", "output_token_ids", "prompt_tokens", "output_tokens",
            "finish_reason", "error", "reference"]


def request_table(path, n: int = 18) -> None:
    rng = random.Random(0)
    sampled = [i % 2 == 1 for i in range(n)]
    pq.write_table(pa.table({
        "request_id": [f"req-{i:02d}" for i in range(n)],
        "adapter_id": [[None, "a1", "a2"][i % 3] for i in range(n)],
        "prompt": [" ".join(f"w{rng.randrange(100)}" for _ in range(rng.randint(2, 12))) for _ in range(n)],
        "max_new_tokens": pa.array([2 + i % 7 for i in range(n)], pa.int32()),
        "temperature": [0.9 if s else None for s in sampled],
        "top_p": [0.95 if s else None for s in sampled],
        "top_k": [20 if i % 4 == 1 else None for i in range(n)],
        "seed": [i if i % 4 == 3 else None for i in range(n)],    # None: derived from request_id
        "reference": [f"ref {i}" for i in range(n)],
    }), path)


def read_results(out) -> pl.DataFrame:
    return pl.read_parquet(f"{out}/**/*.parquet").sort("request_id")


def test_killed_run_resumes_exactly_once(tiny_fleet, tmp_path, lorafleet):
    request_table(tmp_path / "requests.parquet")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"

    def run(out):
        return lorafleet("run", "--model", tiny_fleet["model"], "--adapters", tiny_fleet["adapters"],
                         "--requests", tmp_path / "requests.parquet", "--output", out,
                         "--max-num-seqs", 2, "--rows-per-shard", 2, "--no-progress")

    reference = run(clean)
    _, stderr = reference.communicate(timeout=400)
    assert reference.returncode == 0, stderr

    victim = run(resumed)
    deadline = time.monotonic() + 400
    while not list(resumed.glob("part-*.parquet")):
        assert victim.poll() is None, victim.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    committed = read_results(resumed)
    assert 0 < committed.height < 18, "the kill must land mid-run"

    again = run(resumed)
    stdout, stderr = again.communicate(timeout=400)
    assert again.returncode == 0, stderr
    assert "stale" in stderr                                   # the killed run's lock was taken over
    summaries = [json.loads(p.read_text()) for p in resumed.glob("_runs/*/summary.json")]
    assert [s["rows_skipped"] for s in summaries] == [committed.height]

    final, expected = read_results(resumed), read_results(clean)
    assert final["request_id"].to_list() == [f"req-{i:02d}" for i in range(18)]   # each exactly once
    assert final["run_id"].n_unique() == 2                      # rows of both runs: nothing was redone
    assert final.select(COMPARED).to_dicts() == expected.select(COMPARED).to_dicts()
