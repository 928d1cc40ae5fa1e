"""`lorafleet report`: one night's per-adapter table in the terminal and a chart of scores over the nights."""
import polars as pl
from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.evaluation.charts import night_chart
from pipeline.evaluation.metrics import read_metrics, score_unscored_nights
from pipeline.storage import join, write_bytes

# score -> its (header, cell of a metrics row) columns in the night's table
LIKELIHOOD_COLUMNS = {
    "acc": [("acc", lambda r: _number(r["acc"], ".2f")), ("Δ  ", lambda r: _delta(r["delta_acc"], ".2f"))],
    "acc_norm": [("acc_n", lambda r: _number(r["acc_norm"], ".2f")),
                 ("Δ   ", lambda r: _delta(r["delta_acc_norm"], ".2f"))],
    "token_perplexity": [("ppl", lambda r: _number(r["token_perplexity"], ".1f"))],
}


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _delta(value, fmt: str) -> str:
    return "" if value is None else format(value, "+" + fmt)


def metrics_table(night: pl.DataFrame) -> Table:
    """The night's adapters, each score beside its change since the previous night; regressions in red."""
    date = night["date"][0]
    regressed = night.filter("regressed").sort("adapter_label")
    caption = ("[bold red]regressed: " + ", ".join(f"{label} ({names})" for label, names in
                                                  regressed.select("adapter_label", "regressed_metrics").iter_rows())
               + "[/]" if regressed.height else "no regressions against the previous night")
    table = Table(title=f"adapter metrics, {date}", caption=caption, box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False)
    table.add_column("adapter", no_wrap=True, min_width=night["adapter_label"].str.len_chars().max())
    table.add_column("task", no_wrap=True, min_width=7)
    # multiple-choice and perplexity columns only on nights that have such rows (older nights lack the columns)
    likelihood = {score: cells for score, cells in LIKELIHOOD_COLUMNS.items()
                  if score in night.columns and night[score].is_not_null().any()}
    headers = [h for cells in likelihood.values() for h, _ in cells]
    for name in ("reqs", "err", "exact", "Δ", "chrF", "Δ ", *headers, "tok"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=9)
    for row in night.sort("adapter_label").iter_rows(named=True):
        tasks = (row["task"] or "-").split(",")
        table.add_row(
            row["adapter_label"], tasks[0] if len(tasks) == 1 else f"{len(tasks)} tasks", str(row["requests"]),
            _number(row["error_rate"], ".0%"),
            _number(row["exact_match"], ".2f"), _delta(row["delta_exact_match"], ".2f"),
            _number(row["chrf"], ".1f"), _delta(row["delta_chrf"], ".1f"),
            *[cell(row) for cells in likelihood.values() for _, cell in cells],
            _number(row["mean_output_tokens"], ".1f"),
            "REGRESSED" if row["regressed"] else "ok",
            style="bold red" if row["regressed"] else None)
    return table


def report(root: str, date: str | None = None, out_png: str | None = None, *, margin: float = 0.05,
           storage_options: dict | None = None, console: Console | None = None) -> str:
    """Print the table for `date` (default: the latest night) and write its chart (pipeline.evaluation.charts) to
    `out_png` (default `<root>/metrics/scores.png`, any fsspec URL). Nights with results but no metrics
    are scored first. Returns the chart's path."""
    score_unscored_nights(root, margin=margin, storage_options=storage_options)
    metrics = read_metrics(join(root, "metrics"), storage_options)
    if metrics.is_empty():
        raise FileNotFoundError(f"no metrics under {root.rstrip('/')}/metrics")
    date = date or metrics["date"].max()
    night = metrics.filter(pl.col("date") == date)
    if night.is_empty():
        nights = ", ".join(sorted(metrics["date"].unique().to_list()))
        raise FileNotFoundError(f"no metrics for {date} under {root.rstrip('/')}/metrics (nights: {nights})")
    (console or Console()).print(metrics_table(night))
    out_png = out_png or join(root, "metrics", "scores.png")
    write_night_chart(root, date, out_png, margin, storage_options)
    return out_png


def write_night_chart(root: str, date: str, url: str, margin: float, storage_options: dict | None = None) -> bytes:
    """Write the chart of night `date` (pipeline.evaluation.charts, from the metrics of every night up to it) to
    `url` (any fsspec URL); returns the PNG."""
    history = read_metrics(join(root, "metrics"), storage_options).filter(pl.col("date") <= date)
    png = night_chart(history, date, margin)
    write_bytes(url, png, storage_options)
    return png
