"""The night's chart: one line per adapter for a small fleet; for thousands of adapters, distributions of the
scores and of their change (the margin marked), the largest drops in order, and a per-task summary."""
import random

import matplotlib.pyplot as plt
import polars as pl

from pipeline.evaluation.charts import LINE_CHART_MAX, REGRESSED_SHOWN, night_chart, night_figure
from pipeline.evaluation.metrics import compare_with_previous

MARGIN = 0.05
DATES = ["2026-03-01", "2026-03-02"]


def fake_metrics(adapters: int, tasks: int = 12, seed: int = 0) -> pl.DataFrame:
    """Two nights of metrics as nightly_metrics writes them; on the second night 2% of the adapters drop."""
    rng = random.Random(seed)
    first = [rng.betavariate(5, 2) for _ in range(adapters)]
    second = [max(0.0, em - rng.uniform(0.06, 0.6)) if rng.random() < 0.02 else em for em in first]

    def night(date: str, scores: list[float]) -> pl.DataFrame:
        return pl.DataFrame([{"date": date, "adapter_id": f"adapter-{k:05d}", "adapter_label": f"adapter-{k:05d}",
                              "task": f"task-{k % tasks:02d}", "requests": 32, "errors": 0, "error_rate": 0.0,
                              "exact_match": em, "chrf": 100 * em ** 0.5} for k, em in enumerate(scores)])
    return pl.concat([compare_with_previous(night(DATES[0], first), None, MARGIN),
                      compare_with_previous(night(DATES[1], second), night(DATES[0], first), MARGIN)])


def titled(fig, start: str):
    [ax] = [ax for ax in fig.axes if ax.get_title().startswith(start)]
    return ax


def test_a_small_fleet_gets_one_line_per_adapter():
    metrics = fake_metrics(LINE_CHART_MAX - 1)
    fig = night_figure(metrics, DATES[1], MARGIN)
    assert [ax.get_title() for ax in fig.axes] == ["exact match", "chrF"]
    assert all(len(ax.get_lines()) == LINE_CHART_MAX - 1 for ax in fig.axes)
    plt.close(fig)


def test_thousands_of_adapters_get_distributions_drops_and_tasks():
    metrics = fake_metrics(3000)
    night = metrics.filter(pl.col("date") == DATES[1])
    drop = pl.max_horizontal(-pl.col("delta_exact_match"), -pl.col("delta_chrf") / 100, pl.col("delta_error_rate"))
    regressed = night.filter("regressed").sort(drop, descending=True)
    assert 30 < regressed.height < 100
    fig = night_figure(metrics, DATES[1], MARGIN)

    for score, name, limit in (("exact_match", "exact match", -MARGIN), ("chrf", "chrF", -MARGIN * 100)):
        assert titled(fig, f"{name}: distribution")
        change = titled(fig, f"{name}: change since")
        assert [line.get_xdata()[0] for line in change.get_lines()] == [limit]   # the margin, marked
        below = night.filter(pl.col(f"delta_{score}") < limit).height
        assert f"regressed ({below})" in [t.get_text() for t in change.get_legend().get_texts()]
    drops = titled(fig, "regressed adapters")
    shown = [t.get_text().split(" (")[0] for t in drops.get_yticklabels()][::-1]     # top bar first
    assert shown == regressed["adapter_label"].head(REGRESSED_SHOWN).to_list()         # largest drop first
    assert f"({REGRESSED_SHOWN} of {regressed.height})" in drops.get_title()
    tasks = [t.get_text() for t in titled(fig, "per task").get_yticklabels()]
    assert len(tasks) == 12 and all("250 adapters" in t for t in tasks)
    plt.close(fig)

    png = night_chart(metrics, DATES[1], MARGIN)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
