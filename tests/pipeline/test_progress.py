"""What a run shows while it goes: one definition of throughput on the bar and in the summary, log records
above the bar (not inside it), readable engine figures, and without a bar a log line that counts real progress."""
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq

import pipeline.progress
from engine.config import EngineConfig
from pipeline.run import run_requests

ROWS = [{"request_id": f"r{i}", "adapter_id": ["a1", "a2", None][i % 3], "prompt": "w1 w2 w3 w4",
         "max_new_tokens": 3} for i in range(12)]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def test_bar_and_summary_name_one_throughput_and_logs_go_above_the_bar(tiny_fleet, tmp_path, lorafleet):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "requests.parquet")
    run = lorafleet("run", "--model", tiny_fleet["model"], "--adapters", tiny_fleet["adapters"],
                    "--requests", tmp_path / "requests.parquet", "--output", tmp_path / "out", "--max-num-seqs", 4)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr

    summary = re.search(r"([\d,.]+) output tokens/s, ([\d,.]+) total tokens/s", stdout)
    bar = re.findall(r"([\d,]+) output tokens/s, \d+ adapter loads\]", stderr)
    assert summary and bar, (stdout, stderr)
    assert abs(float(bar[-1].replace(",", "")) - float(summary[1].replace(",", ""))) <= 1
    assert float(summary[2].replace(",", "")) > float(summary[1].replace(",", ""))   # prompt tokens count there

    # tqdm redraws with \r: every piece of the stream is either the bar or a whole log record, never both
    pieces = [p.strip() for p in re.split(r"[\r\n]", stderr) if p.strip()]
    [engine_line] = [p for p in pieces if "engine done" in p]
    assert TIMESTAMP.match(engine_line), engine_line
    assert "EngineStats(" not in engine_line and "adapter loads" in engine_line and "pool peak" in engine_line
    assert all(TIMESTAMP.match(p) or p.startswith("generating:") for p in pieces), pieces


def test_without_a_bar_the_log_line_counts_rows_done(tiny_fleet, tmp_path, caplog, monkeypatch):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "requests.parquet")
    monkeypatch.setattr(pipeline.progress, "LOG_EVERY_S", 0.0)
    config = EngineConfig(model=str(tiny_fleet["model"]), adapters=str(tiny_fleet["adapters"]), max_num_seqs=4)
    with caplog.at_level(logging.INFO, logger="lorafleet"):
        summary = run_requests(config, str(tmp_path / "requests.parquet"), str(tmp_path / "out"), progress=False)
    counts = [m.split()[0] for m in caplog.messages if " requests, " in m and "output tokens/s" in m]
    assert counts == [f"{n}/12" for n in range(1, 13)]
    assert summary.generate_s > 0 and summary.output_tokens_per_s == summary.output_tokens / summary.generate_s
