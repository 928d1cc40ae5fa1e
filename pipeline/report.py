"""`lorafleet report`: one night's per-adapter table in the terminal and a chart of scores over the nights."""
import io
import posixpath

import fsspec
import matplotlib
import polars as pl
from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.metrics import read_metrics, score_unscored_nights
from pipeline.storage import join

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

CHART_SCORES = {"exact_match": "exact match", "chrf": "chrF", "acc": "acc (multiple choice)",
                "acc_norm": "acc_norm (per byte)", "token_perplexity": "token perplexity"}
MARKERS = "osD^vP*Xh<>"
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


def score_chart(metrics: pl.DataFrame) -> bytes:
    """PNG: one panel per score the nights have, one line per adapter over the nights, regressions circled in red."""
    dates = sorted(metrics["date"].unique().to_list())
    x_of = {d: i for i, d in enumerate(dates)}
    labels = sorted(metrics["adapter_label"].unique().to_list())
    scores = [s for s in CHART_SCORES if s in metrics.columns and metrics[s].is_not_null().any()] \
        or ["exact_match", "chrf"]     # empty panels rather than no chart
    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores) + 2, 4.5), squeeze=False)
    for ax, score in zip(axes[0], scores):
        for i, label in enumerate(labels):
            rows = metrics.filter((pl.col("adapter_label") == label) & pl.col(score).is_not_null()).sort("date")
            x = [x_of[d] for d in rows["date"]]
            # distinct markers, shrinking, so adapters with equal scores stay visible on top of each other
            ax.plot(x, rows[score].to_list(), marker=MARKERS[i % len(MARKERS)], markersize=max(11 - i, 4),
                    label=label, alpha=0.85)
            bad = rows.filter("regressed")
            ax.scatter([x_of[d] for d in bad["date"]], bad[score].to_list(), s=260, facecolors="none",
                       edgecolors="red", linewidths=2, zorder=3)
        ax.set_title(CHART_SCORES[score])
        ax.set_xticks(range(len(dates)), dates, rotation=30, ha="right")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize="small")
    fig.suptitle("adapter scores per night (red circle: regressed)")
    fig.tight_layout(rect=(0, 0, 1 - 2 / fig.get_figwidth(), 1))   # 2 inches on the right for the legend
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def report(root: str, date: str | None = None, out_png: str | None = None, *,
           storage_options: dict | None = None, console: Console | None = None) -> str:
    """Print the table for `date` (default: the latest night) and write the chart of the nights up to it to
    `out_png` (default `<root>/metrics/scores.png`, any fsspec URL). Nights with results but no metrics
    are scored first. Returns the chart's path."""
    score_unscored_nights(root, storage_options=storage_options)
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
