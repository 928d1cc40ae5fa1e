"""The chart of a night's adapter metrics, as a PNG: `lorafleet report` writes it, Dagster shows it.

A small fleet gets one line per adapter over the nights. Past LINE_CHART_MAX adapters lines are unreadable,
so a fleet gets the night's distribution of each score and of its change since the previous night (the
regression margin marked), the regressed adapters by the size of their drop, and a per-task summary."""
import io

import matplotlib
import polars as pl

from pipeline.evaluation.metrics import HIGHER_IS_BETTER, SCORE_SCALE, SCORES, worsening

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LINE_CHART_MAX = 12                    # adapters (the base model included) drawn one line each
REGRESSED_SHOWN = 25                   # bars in the largest-drops panel
TASKS_SHOWN = 15                       # tasks in the per-task panel
TITLES = {"exact_match": "exact match", "chrf": "chrF", "error_rate": "error rate", "acc": "acc (multiple choice)",
          "acc_norm": "acc_norm (per byte)", "word_perplexity": "word perplexity",
          "token_perplexity": "token perplexity"}
MARKERS = "osD^vP*Xh<>"
DPI = 80


def charted_scores(metrics: pl.DataFrame) -> list[str]:
    """The quality scores the table has values for (error rate is charted through the regressions only)."""
    return [m for m in SCORES if m != "error_rate" and m in metrics.columns and metrics[m].drop_nulls().len()]


def night_chart(history: pl.DataFrame, date: str, margin: float) -> bytes:
    """The PNG of night `date`, from the metrics of every night up to it."""
    fig = night_figure(history, date, margin)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def night_figure(history: pl.DataFrame, date: str, margin: float) -> Figure:
    night = history.filter(pl.col("date") == date)
    return fleet_figure(night, margin) if night.height > LINE_CHART_MAX else line_figure(history)


def line_figure(metrics: pl.DataFrame) -> Figure:
    """One panel per score, one line per adapter over the nights, regressions circled in red."""
    scores = charted_scores(metrics)
    dates = sorted(metrics["date"].unique().to_list())
    x_of = {d: i for i, d in enumerate(dates)}
    labels = sorted(metrics["adapter_label"].unique().to_list())
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
        ax.set_title(TITLES.get(score, score))
        ax.set_xticks(range(len(dates)), dates, rotation=30, ha="right")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize="small")
    fig.suptitle("adapter scores per night (red circle: regressed)")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    return fig


def worst_drop(night: pl.DataFrame) -> pl.Expr:
    """Each adapter's largest worsening since its previous night, in margin units (metrics.worsening)."""
    return pl.max_horizontal([worsening(m) for m in SCORES if f"delta_{m}" in night.columns])


def fleet_figure(night: pl.DataFrame, margin: float) -> Figure:
    """For one night of many adapters: per score, its distribution (the previous night outlined) and the
    distribution of its change (the regression margin marked, drops past it in red); then the regressed
    adapters by the size of their drop, and the tasks' mean scores with their adapters and regressions."""
    scores = charted_scores(night)
    fig = plt.figure(figsize=(6.5 * max(len(scores), 2), 15))
    grid = fig.add_gridspec(3, max(len(scores), 2), height_ratios=[1, 1, 1.5])
    for col, score in enumerate(scores):
        name, scale = TITLES.get(score, score), SCORE_SCALE[score]
        ax = fig.add_subplot(grid[0, col])
        bins = [scale * i / 20 for i in range(21)] if scale else 20   # perplexity has no fixed range
        ax.hist(night[score].drop_nulls().to_list(), bins=bins, color="tab:blue", alpha=0.7, label=night["date"][0])
        ax.hist(night[f"prev_{score}"].drop_nulls().to_list(), bins=bins, histtype="step", color="black",
                label="previous night")
        ax.set(title=f"{name}: distribution over adapters", xlabel=name, ylabel="adapters")
        ax.legend(fontsize="small")
        _change_panel(fig.add_subplot(grid[1, col]), night, score, margin)
    _drops_panel(fig.add_subplot(grid[2, 0]), night, margin)
    _tasks_panel(fig.add_subplot(grid[2, 1:]), night, scores)
    regressed = night["regressed"].sum()
    fig.suptitle(f"{night['date'][0]}: {night.height:,} adapters, {regressed:,} regressed "
                 f"(a drop of more than {margin:g} of a score's range)", fontsize="x-large")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def _change_panel(ax, night: pl.DataFrame, score: str, margin: float) -> None:
    """The change of a score since the previous night (as a share of the previous value where the score has
    no fixed scale, as for perplexity), the margin marked."""
    name, scale = TITLES.get(score, score), SCORE_SCALE[score]
    sign = -1 if HIGHER_IS_BETTER[score] else 1
    change = night.select(worsening(score) * sign * (scale or 1)).to_series().drop_nulls()
    limit = sign * margin * (scale or 1)
    worse = change.filter(change * sign > margin * (scale or 1))
    bins = [scale * (i / 20 - 1) for i in range(41)] if scale else 40
    ax.hist(change.to_list(), bins=bins, color="tab:gray", label="change")
    ax.hist(worse.to_list(), bins=bins, color="red", label=f"regressed ({worse.len():,})")
    ax.axvline(limit, color="red", linestyle="--", label=f"margin ({limit:+g})")
    ax.set_yscale("log")   # most adapters do not move: the tails are what matters
    ax.set(title=f"{name}: change since the previous night", ylabel="adapters (log)",
           xlabel=f"Δ {name}" if scale else f"Δ {name} / previous night's")
    ax.legend(fontsize="small")


def _drops_panel(ax, night: pl.DataFrame, margin: float) -> None:
    regressed = night.filter("regressed").with_columns(worst_drop(night).alias("drop")).sort("drop", descending=True)
    shown = regressed.head(REGRESSED_SHOWN)
    labels = [f"{a} ({m})" for a, m in zip(shown["adapter_label"], shown["regressed_metrics"])]
    ax.barh(labels[::-1], shown["drop"].to_list()[::-1], color="red")
    ax.axvline(margin, color="black", linestyle="--", label=f"margin {margin:g}")
    ax.set(title=f"regressed adapters, largest drop first ({shown.height:,} of {regressed.height:,})",
           xlabel="largest drop, as a fraction of the score's range")
    ax.tick_params(axis="y", labelsize="small")
    if regressed.is_empty():
        ax.text(0.5, 0.5, "no adapter regressed", ha="center", va="center", transform=ax.transAxes)
    ax.legend(fontsize="small", loc="lower right")


def _tasks_panel(ax, night: pl.DataFrame, scores: list[str]) -> None:
    """Mean of each score (as a fraction of its range) per task, the previous night's as a tick; the tasks
    with the most regressed adapters, then the most adapters, first."""
    per_task = (night.with_columns(pl.col("task").fill_null("(no task)").str.split(",")).explode("task")
                .group_by("task").agg(pl.len().alias("adapters"), pl.col("regressed").sum().alias("regressed"),
                                      *[(pl.col(m).mean() / SCORE_SCALE[m]).alias(m) for m in scores],
                                      *[(pl.col(f"prev_{m}").mean() / SCORE_SCALE[m]).alias(f"prev_{m}")
                                        for m in scores])
                .sort(["regressed", "adapters", "task"], descending=[True, True, False]).head(TASKS_SHOWN))
    height = 0.8 / max(len(scores), 1)
    rows = list(range(per_task.height))[::-1]
    for k, score in enumerate(scores):
        y = [r + (k - (len(scores) - 1) / 2) * height for r in rows]
        ax.barh(y, per_task[score].fill_null(0).to_list(), height=height, label=TITLES.get(score, score))
        ax.scatter(per_task[f"prev_{score}"].to_list(), y, marker="|", s=120, color="black",
                   label="previous night" if k == 0 else None, zorder=3)
    ax.set_yticks(rows, [f"{t}  ({a:,} adapters, {r:,} regressed)" for t, a, r in
                         per_task.select("task", "adapters", "regressed").iter_rows()], fontsize="small")
    ax.set(title="per task: mean score, as a fraction of its range", xlim=(0, 1.05))
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=len(scores) + 1)
