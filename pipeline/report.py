"""`lorafleet report`: one night's per-adapter table in the terminal and a chart of scores over the nights."""
import io
import posixpath

import fsspec
import matplotlib
import polars as pl
from rich.console import Console
from rich.table import Table

from pipeline.metrics import read_metrics
from pipeline.storage import join

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

CHART_SCORES = {"exact_match": "exact match", "chrf": "chrF"}


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _with_delta(value, delta, fmt: str) -> str:
    text = _number(value, fmt)
    return text if delta is None else f"{text} ({delta:+{fmt}})"


def metrics_table(night: pl.DataFrame) -> Table:
    """The night's adapters, regressions in red and named."""
    date = night["date"][0]
    regressed = night.filter("regressed")["adapter_label"].to_list()
    caption = (f"[bold red]regressed: {', '.join(regressed)}[/]" if regressed
               else "no regressions against the previous night")
    table = Table(title=f"lorafleet adapter metrics, {date}", caption=caption)
    for name in ("adapter", "task", "requests", "error rate", "exact match (Δ)", "chrF (Δ)", "mean out tok",
                 "p95 out tok", "status"):
        table.add_column(name, justify="left" if name in ("adapter", "task", "status") else "right")
    for row in night.sort("adapter_label").iter_rows(named=True):
        status = f"REGRESSED: {row['regressed_metrics']}" if row["regressed"] else "ok"
        table.add_row(
            row["adapter_label"], row["task"] or "-", str(row["requests"]),
            _with_delta(row["error_rate"], row["delta_error_rate"], ".2f"),
            _with_delta(row["exact_match"], row["delta_exact_match"], ".2f"),
            _with_delta(row["chrf"], row["delta_chrf"], ".1f"),
            _number(row["mean_output_tokens"], ".1f"), _number(row["p95_output_tokens"], ".1f"), status,
            style="bold red" if row["regressed"] else None)
    return table


def score_chart(metrics: pl.DataFrame) -> bytes:
    """PNG: one panel per score, one line per adapter over the nights, regressions circled in red."""
    dates = sorted(metrics["date"].unique().to_list())
    x_of = {d: i for i, d in enumerate(dates)}
    fig, axes = plt.subplots(1, len(CHART_SCORES), figsize=(6 * len(CHART_SCORES), 4.5), squeeze=False)
    for ax, (score, title) in zip(axes[0], CHART_SCORES.items()):
        for label, rows in metrics.sort("date").group_by("adapter_label", maintain_order=True):
            rows = rows.filter(pl.col(score).is_not_null())
            x = [x_of[d] for d in rows["date"]]
            ax.plot(x, rows[score].to_list(), marker="o", label=label[0])
            bad = rows.filter("regressed")
            ax.scatter([x_of[d] for d in bad["date"]], bad[score].to_list(), s=160, facecolors="none",
                       edgecolors="red", linewidths=2, zorder=3)
        ax.set_title(title)
        ax.set_xticks(range(len(dates)), dates, rotation=30, ha="right")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="best")
    fig.suptitle("adapter scores per night (red circle: regressed)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def report(root: str, date: str | None = None, out_png: str | None = None, *,
           storage_options: dict | None = None, console: Console | None = None) -> str:
    """Print the table for `date` (default: the latest night) and write the chart of all nights to
    `out_png` (default `<root>/metrics/scores.png`, any fsspec URL). Returns the chart's path."""
    metrics = read_metrics(join(root, "metrics"), storage_options)
    if metrics.is_empty():
        raise FileNotFoundError(f"no metrics under {root.rstrip('/')}/metrics")
    date = date or metrics["date"].max()
    night = metrics.filter(pl.col("date") == date)
    if night.is_empty():
        raise FileNotFoundError(f"no metrics for {date} under {root.rstrip('/')}/metrics")
    (console or Console()).print(metrics_table(night))
    out_png = out_png or join(root, "metrics", "scores.png")
    fs, path = fsspec.core.url_to_fs(out_png, **(storage_options or {}))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(score_chart(metrics.filter(pl.col("date") <= date)))
    return out_png
