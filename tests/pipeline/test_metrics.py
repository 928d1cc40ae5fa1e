import io

import fsspec
import polars as pl
import pytest
from sacrebleu.metrics import CHRF

from pipeline.evaluation.metrics import compare_with_previous, compute_adapter_metrics, nightly_metrics
from pipeline.layout import metrics_url, results_url


def results_table(rows: list[tuple]) -> pl.DataFrame:
    """rows: (adapter_id, output_text, output_tokens, finish_reason, reference, task)."""
    return pl.DataFrame(
        [(f"r{i}", *row) for i, row in enumerate(rows)],
        schema={"request_id": pl.String, "adapter_id": pl.String, "output_text": pl.String,
                "output_tokens": pl.Int32, "finish_reason": pl.String, "reference": pl.String, "task": pl.String},
        orient="row")


NIGHT = results_table([
    ("rev", "c b a", 4, "stop", "c b a", "reverse"),
    ("rev", " f e d \n", 4, "stop", "f e d", "reverse"),      # stripped before comparing
    ("rev", "g h i", 4, "stop", "i h g", "reverse"),
    ("rev", None, 0, "error", "l k j", "reverse"),            # an error scores as an empty output
    ("srt", "a b c", 4, "stop", "a b c", "sort"),
    ("srt", "x y", 10, "length", "x y z", "sort"),
    ("srt", "p q", 3, "stop", None, "sort"),                  # no reference: counted, not scored
    (None, "a b c", 4, "stop", "c b a", "reverse"),
    (None, "x y z", 4, "stop", "x y z", "sort"),
])


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def chrf(hypotheses, references) -> float:
    return CHRF().corpus_score(hypotheses, [references]).score


def test_adapter_metrics_exact_values():
    m = compute_adapter_metrics(NIGHT, "2026-01-02")
    assert m["adapter_label"].to_list() == ["<base>", "rev", "srt"]
    assert m["adapter_id"].to_list() == [None, "rev", "srt"]
    assert m["date"].to_list() == ["2026-01-02"] * 3
    assert m["task"].to_list() == ["reverse,sort", "reverse", "sort"]
    assert m["requests"].to_list() == [2, 4, 3]
    assert m["errors"].to_list() == [0, 1, 0]
    assert m["error_rate"].to_list() == [0.0, 0.25, 0.0]
    assert m["exact_match"].to_list() == [0.5, 0.5, 0.5]
    # tokens over rows that did not fail; p95 by linear interpolation
    assert m["mean_output_tokens"].to_list() == [4.0, 4.0, pytest.approx(17 / 3)]
    assert m["p95_output_tokens"].to_list() == [4.0, 4.0, pytest.approx(4 + 0.9 * 6)]
    assert m["chrf"].to_list() == [
        pytest.approx(chrf(["a b c", "x y z"], ["c b a", "x y z"])),
        pytest.approx(chrf(["c b a", "f e d", "g h i", ""], ["c b a", "f e d", "i h g", "l k j"])),
        pytest.approx(chrf(["a b c", "x y"], ["a b c", "x y z"])),
    ]


def test_metrics_without_references_or_tasks():
    m = compute_adapter_metrics(NIGHT.drop("reference", "task"), "2026-01-02")
    assert m["exact_match"].null_count() == 3 and m["chrf"].null_count() == 3
    assert m["task"].null_count() == 3
    assert m["requests"].to_list() == [2, 4, 3]


def test_metrics_of_a_base_only_night():
    # a Parquet column that is null in every row reads back with dtype Null
    base_only = NIGHT.filter(pl.col("adapter_id").is_null()).with_columns(
        pl.lit(None).alias("adapter_id"), pl.lit(None).alias("task"))
    m = compute_adapter_metrics(base_only, "2026-01-02")
    assert m.select("adapter_id", "adapter_label", "task", "requests", "exact_match").rows() == [
        (None, "<base>", None, 2, 0.5)]


def metrics_row(adapter_id, exact_match, chrf_score, error_rate, date="2026-01-01") -> dict:
    return dict(date=date, adapter_id=adapter_id, exact_match=exact_match, chrf=chrf_score, error_rate=error_rate)


def test_compare_flags_drops_beyond_margin():
    previous = pl.DataFrame([
        metrics_row("steady", 0.90, 80.0, 0.00),
        metrics_row("em_drop", 0.90, 80.0, 0.00),
        metrics_row("chrf_drop", 0.90, 80.0, 0.00),
        metrics_row("errors_up", 0.90, 80.0, 0.00),
        metrics_row(None, 0.25, 40.0, 0.00),
    ])
    current = pl.DataFrame([
        metrics_row("steady", 0.875, 76.0, 0.04, date="2026-01-02"),   # each change within 0.05
        metrics_row("em_drop", 0.75, 80.0, 0.00, date="2026-01-02"),
        metrics_row("chrf_drop", 0.90, 70.0, 0.00, date="2026-01-02"),
        metrics_row("errors_up", 0.90, 80.0, 0.25, date="2026-01-02"),
        metrics_row(None, 0.0, 10.0, 0.00, date="2026-01-02"),          # the base is compared too
        metrics_row("new", 0.10, 10.0, 0.50, date="2026-01-02"),        # no previous night: never regressed
    ])
    out = compare_with_previous(current, previous, margin=0.05)
    by = {row["adapter_id"]: row for row in out.iter_rows(named=True)}
    assert {k: by[k]["regressed"] for k in by} == {
        "steady": False, "em_drop": True, "chrf_drop": True, "errors_up": True, None: True, "new": False}
    assert by["em_drop"]["regressed_metrics"] == "exact_match"
    assert by["chrf_drop"]["regressed_metrics"] == "chrf"
    assert by["errors_up"]["regressed_metrics"] == "error_rate"
    assert by[None]["regressed_metrics"] == "exact_match,chrf"
    assert by["steady"]["regressed_metrics"] == ""
    assert by["em_drop"]["prev_exact_match"] == 0.90
    assert by["em_drop"]["delta_exact_match"] == pytest.approx(-0.15)
    assert by["chrf_drop"]["delta_chrf"] == pytest.approx(-10.0)
    assert by["steady"]["prev_date"] == "2026-01-01"
    assert by["new"]["prev_date"] is None and by["new"]["delta_chrf"] is None
    # a wider margin forgives the same drops
    assert not compare_with_previous(current, previous, margin=0.5)["regressed"].any()


def test_compare_without_previous_night():
    current = pl.DataFrame([metrics_row("a", 0.5, 50.0, 0.0)])
    out = compare_with_previous(current, None, margin=0.05)
    assert out["regressed"].to_list() == [False]
    assert out["prev_exact_match"].to_list() == [None]


def write_results(root, date, frame: pl.DataFrame, parts: int = 2) -> None:
    day = results_url(str(root), date)
    (root / "results" / f"date={date}" / "_runs" / "x").mkdir(parents=True)
    size = -(-frame.height // parts)
    for i in range(parts):
        frame.slice(i * size, size).write_parquet(f"{day}/part-{i}.parquet")
    # run records and temp files live under `_` names and must be skipped
    frame.head(1).write_parquet(f"{day}/_runs/x/plan.parquet")


def test_nightly_metrics_reads_compares_and_writes(tmp_path):
    first = NIGHT
    # the second night: `rev` gets everything wrong, `srt` gets everything right
    second = NIGHT.with_columns(
        pl.when(pl.col("adapter_id") == "rev").then(pl.lit("wrong"))
        .when(pl.col("adapter_id") == "srt").then(pl.col("reference"))
        .otherwise(pl.col("output_text")).alias("output_text"))
    write_results(tmp_path, "2026-01-01", first)
    write_results(tmp_path, "2026-01-03", second)
    night1 = nightly_metrics(str(tmp_path), "2026-01-01")
    assert not night1["regressed"].any()
    assert night1.drop([c for c in night1.columns if c.startswith(("prev_", "delta_", "regressed"))]).equals(
        compute_adapter_metrics(first, "2026-01-01"))
    night3 = nightly_metrics(str(tmp_path), "2026-01-03", margin=0.05)
    assert night3.filter("regressed")["adapter_label"].to_list() == ["rev"]
    assert night3["prev_date"].to_list() == ["2026-01-01"] * 3
    written = pl.read_parquet(f"{metrics_url(str(tmp_path), '2026-01-03')}/metrics.parquet")
    assert written.equals(night3)
    # an earlier night added later compares with the nights before it only
    write_results(tmp_path, "2026-01-02", second)
    night2 = nightly_metrics(str(tmp_path), "2026-01-02")
    assert night2["prev_date"].to_list() == ["2026-01-01"] * 3
    assert sorted(p.name for p in (tmp_path / "metrics" / "date=2026-01-02").iterdir()) == ["metrics.parquet"]


def test_nightly_metrics_on_memory_filesystem():
    root = "memory://lorafleet-test-metrics"
    fs = fsspec.filesystem("memory")
    with fs.open(f"{results_url('/lorafleet-test-metrics', '2026-01-01')}/part-0.parquet", "wb") as f:
        NIGHT.write_parquet(f)
    out = nightly_metrics(root, "2026-01-01")
    assert out["requests"].sum() == NIGHT.height
    assert fs.exists(f"{metrics_url('/lorafleet-test-metrics', '2026-01-01')}/metrics.parquet")


def test_nightly_metrics_without_results(tmp_path):
    with pytest.raises(FileNotFoundError):
        nightly_metrics(str(tmp_path), "2026-01-01")
    (tmp_path / "results" / "date=2026-01-01" / "_runs").mkdir(parents=True)   # ran, but had no requests
    assert nightly_metrics(str(tmp_path), "2026-01-01").height == 0


def test_each_adapter_compares_with_its_own_previous_night(tmp_path):
    write_results(tmp_path, "2026-01-01", NIGHT)
    write_results(tmp_path, "2026-01-02", NIGHT.filter(pl.col("adapter_id").ne_missing("rev")))   # no rev rows
    wrong = NIGHT.with_columns(pl.when(pl.col("adapter_id") == "rev").then(pl.lit("wrong"))
                               .otherwise(pl.col("output_text")).alias("output_text"))
    write_results(tmp_path, "2026-01-03", wrong)
    for date in ("2026-01-01", "2026-01-02"):
        nightly_metrics(str(tmp_path), date)
    night3 = nightly_metrics(str(tmp_path), "2026-01-03").sort("adapter_label")
    assert night3["prev_date"].to_list() == ["2026-01-02", "2026-01-01", "2026-01-02"]   # <base>, rev, srt
    assert night3.filter("regressed")["adapter_label"].to_list() == ["rev"]


def test_nightly_metrics_on_s3(s3_bucket):
    bucket, storage_options = s3_bucket
    root = f"s3://{bucket}/deployment"
    fs = fsspec.filesystem("s3", **storage_options)
    for date, frame in (("2026-01-01", NIGHT), ("2026-01-02", NIGHT.with_columns(pl.lit("wrong").alias("output_text")))):
        fs.pipe(f"{bucket}/deployment/results/date={date}/part-0.parquet", parquet_bytes(frame))
    nightly_metrics(root, "2026-01-01", storage_options=storage_options)
    night2 = nightly_metrics(root, "2026-01-02", storage_options=storage_options)
    assert night2.filter("regressed")["adapter_label"].to_list() == ["<base>", "rev", "srt"]
    assert fs.exists(f"{bucket}/deployment/metrics/date=2026-01-02/metrics.parquet")
