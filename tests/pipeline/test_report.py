import polars as pl
import pytest
from rich.console import Console

from pipeline.evaluation.metrics import nightly_metrics
from pipeline.evaluation.report import report
from pipeline.layout import results_url

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_night(root, date: str, outputs: dict[str | None, list[str]], score: bool = True) -> None:
    """Results of one night: per adapter, its outputs against the references a b c / d e f / ..."""
    references = ["a b c", "d e f", "g h i", "j k l"]
    rows = [(f"{adapter}-{i}", adapter, text, 3, "stop", references[i], "t")
            for adapter, texts in outputs.items() for i, text in enumerate(texts)]
    frame = pl.DataFrame(rows, orient="row", schema={
        "request_id": pl.String, "adapter_id": pl.String, "output_text": pl.String, "output_tokens": pl.Int32,
        "finish_reason": pl.String, "reference": pl.String, "task": pl.String})
    (root / "results" / f"date={date}").mkdir(parents=True)
    frame.write_parquet(f"{results_url(str(root), date)}/part-0.parquet")
    if score:
        nightly_metrics(str(root), date)


@pytest.fixture
def three_nights(tmp_path):
    good = ["a b c", "d e f", "g h i", "j k l"]
    write_night(tmp_path, "2026-03-01", {"alpha": good, "beta": good, None: ["x"] * 4})
    write_night(tmp_path, "2026-03-02", {"alpha": good, "beta": good, None: ["x"] * 4})
    write_night(tmp_path, "2026-03-03", {"alpha": good, "beta": ["a b c", "x", "x", "x"], None: ["x"] * 4})
    return tmp_path


def printed(console: Console) -> str:
    return console.export_text()


def test_report_prints_latest_night_and_writes_png(three_nights):
    console = Console(record=True, width=200)
    png = report(str(three_nights), None, None, console=console)
    text = printed(console)
    assert "2026-03-03" in text
    assert "<base>" in text and "alpha" in text
    beta_line = next(line for line in text.splitlines() if "beta" in line and "REGRESSED" in line)
    assert beta_line.split()[4:6] == ["0.25", "-0.75"]          # exact match and its change
    assert "regressed: beta (exact_match,chrf)" in text
    assert not any("REGRESSED" in line for line in text.splitlines() if "alpha" in line)
    assert png == f"{three_nights}/metrics/scores.png"
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_report_for_an_earlier_date_and_custom_png(three_nights, tmp_path_factory):
    console = Console(record=True, width=200)
    out = tmp_path_factory.mktemp("charts") / "sub" / "chart.png"
    png = report(str(three_nights), "2026-03-02", str(out), console=console)
    text = printed(console)
    assert "2026-03-02" in text and "REGRESSED" not in text
    assert "no regressions" in text
    assert png == str(out) and out.read_bytes()[:8] == PNG_MAGIC


def test_report_scores_nights_that_have_only_results(tmp_path):
    good = ["a b c", "d e f", "g h i", "j k l"]
    write_night(tmp_path, "2026-03-01", {"alpha": good}, score=False)
    write_night(tmp_path, "2026-03-02", {"alpha": ["x"] * 4}, score=False)
    console = Console(record=True, width=200)
    report(str(tmp_path), None, None, console=console)
    assert "regressed: alpha (exact_match,chrf)" in console.export_text()
    assert (tmp_path / "metrics" / "date=2026-03-01" / "metrics.parquet").exists()


def test_report_without_metrics(tmp_path):
    with pytest.raises(FileNotFoundError):
        report(str(tmp_path), None, None)
    with pytest.raises(FileNotFoundError):
        report(str(tmp_path), "2026-03-02", None)


def test_cli_report_without_metrics_says_so_in_one_line(tmp_path, capsys):
    from pipeline.cli import main
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metrics" in err[0]


def test_cli_report_for_a_date_the_data_lacks_lists_the_nights(three_nights, capsys):
    from pipeline.cli import main
    assert main(["report", str(three_nights), "--date", "2026-01-02"]) == 2
    [err] = capsys.readouterr().err.strip().splitlines()
    assert "no metrics for 2026-01-02" in err and "(nights: 2026-03-01, 2026-03-02, 2026-03-03)" in err
