"""Per-adapter scores of one night, compared with the adapter's previous night.

One metrics row per adapter and night. The base model (null adapter_id) keeps a null adapter_id,
as in the results, and gets the label `<base>` in `adapter_label` (no adapter_id can start with `<`).
`score_groups` gives the same scores per any grouping, e.g. per adapter and `task`.

Generated rows (not scored, not in a choice group), where the results carry a `reference` column (rows
without a reference are not scored):
- exact_match: fraction of scored rows whose output equals the reference, both stripped of
  surrounding whitespace. An error row (null output) counts as an empty output, so an adapter
  that fails its rows scores low instead of dropping out.
- chrf: sacrebleu's corpus-level chrF (character 6-grams, beta 2) over the scored rows, 0-100.
Token counts (mean, p95 with linear interpolation) are over generated rows that did not fail.

Multiple choice, as lm-evaluation-harness scores it: rows sharing a `choice_group` (and adapter) are the
choices of one question, each with its `choice_label`; the group's `gold` names the right one (labels and
gold compared as strings; a question without gold is not counted). Per question, the prediction is the
choice with the largest continuation_logprob (acc), or the largest continuation_logprob divided by the
continuation's length in UTF-8 bytes (acc_norm; the harness divides by its length in characters, the same
for ASCII); ties go to the first label in sorted order. A question with a failed choice counts as wrong.
`questions` counts them; acc and acc_norm are the fractions answered right.

Perplexity over the scored rows outside any choice group (a held-out text as the continuation), as the
harness's weighted perplexity: exp(-sum of continuation_logprob / sum of words), words being
len(re.split(r"\\s+", text)) of each continuation's text (word_perplexity), or / sum of continuation_tokens
(token_perplexity).

A regression against the previous night is a drop of more than `margin` in exact_match, acc or acc_norm
(fractions, 0-1), or in chrf / 100, a rise of more than `margin` in error_rate, or a rise of a perplexity
by more than `margin` of its previous value.
"""
import io

import fsspec
import polars as pl
from sacrebleu.metrics import CHRF

from pipeline.layout import metrics_url, results_url
from pipeline.storage import filesystem, join, publish, visible_files

BASE_LABEL = "<base>"
SCORES = ("exact_match", "chrf", "acc", "acc_norm", "word_perplexity", "token_perplexity", "error_rate")  # compared
# a change counts against the margin as a share of this scale (None: of the previous night's value)
SCORE_SCALE = {"exact_match": 1.0, "chrf": 100.0, "acc": 1.0, "acc_norm": 1.0, "word_perplexity": None,
               "token_perplexity": None, "error_rate": 1.0}
HIGHER_IS_BETTER = {"exact_match": True, "chrf": True, "acc": True, "acc_norm": True, "word_perplexity": False,
                    "token_perplexity": False, "error_rate": False}
METRICS_FILE = "metrics.parquet"
# result columns the scores read, with their types: all-null columns read back as dtype Null, and a night
# without scored rows, choices or references may lack them
READ_COLUMNS = {"adapter_id": pl.String, "task": pl.String, "output_text": pl.String, "reference": pl.String,
                "choice_group": pl.String, "choice_label": pl.String, "gold": pl.String,
                "continuation_logprob": pl.Float64, "continuation_tokens": pl.Int64}
GENERATED = (pl.col("finish_reason") != "scored") & pl.col("choice_group").is_null()


def chrf_score(hypotheses: list[str], references: list[str]) -> float:
    return CHRF().corpus_score(hypotheses, [references]).score


def _typed(results: pl.DataFrame) -> pl.DataFrame:
    return results.with_columns(pl.col(c).cast(t) if c in results.columns else pl.lit(None, dtype=t).alias(c)
                                for c, t in READ_COLUMNS.items())


def _reference_scores(group: pl.DataFrame) -> dict:
    scored = group.filter(pl.col("reference").is_not_null() & GENERATED)
    if scored.height == 0:
        return {"exact_match": None, "chrf": None}
    hypotheses = [(text or "").strip() for text in scored["output_text"].to_list()]
    references = [ref.strip() for ref in scored["reference"].to_list()]
    exact = sum(h == r for h, r in zip(hypotheses, references)) / len(references)
    return {"exact_match": exact, "chrf": chrf_score(hypotheses, references)}


def _choice_scores(results: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """questions, acc and acc_norm per group of keys (a question is a choice_group of one adapter)."""
    logprob = pl.col("continuation_logprob")
    per_byte = logprob / pl.col("output_text").str.len_bytes()
    questions = (results.filter(pl.col("choice_group").is_not_null()).sort("choice_label", nulls_last=True)
                 .group_by(list(dict.fromkeys([*keys, "adapter_id", "choice_group"]))).agg(
                     pl.col("gold").drop_nulls().first(),
                     logprob.is_not_null().all().alias("complete"),
                     pl.col("choice_label").get(logprob.fill_null(float("-inf")).arg_max()).alias("pred"),
                     pl.col("choice_label").get(per_byte.fill_null(float("-inf")).arg_max()).alias("pred_norm"))
                 .filter(pl.col("gold").is_not_null()))
    right = lambda pred: (pl.col("complete") & (pl.col(pred) == pl.col("gold"))).fill_null(False).mean()  # noqa
    return questions.group_by(keys).agg(pl.len().cast(pl.Int64).alias("questions"), right("pred").alias("acc"),
                                        right("pred_norm").alias("acc_norm"))


def _perplexities(results: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    logprob = pl.col("continuation_logprob")
    words = pl.col("output_text").str.count_matches(r"\s+") + 1      # = len(re.split(r"\s+", text))
    return (results.filter(logprob.is_not_null() & pl.col("choice_group").is_null()).group_by(keys).agg(
        (-logprob.sum() / words.sum()).exp().alias("word_perplexity"),
        (-logprob.sum() / pl.col("continuation_tokens").sum()).exp().alias("token_perplexity")))


def score_groups(results: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Counts, token statistics, reference, multiple-choice and perplexity scores per group of `keys`
    (null keys form a group)."""
    results = _typed(results)
    failed = pl.col("finish_reason") == "error"
    counted = ~failed & GENERATED
    counts = results.group_by(keys, maintain_order=True).agg(
        pl.len().cast(pl.Int64).alias("requests"),
        failed.sum().cast(pl.Int64).alias("errors"),
        pl.col("output_tokens").filter(counted).mean().cast(pl.Float64).alias("mean_output_tokens"),
        pl.col("output_tokens").filter(counted).quantile(0.95, "linear").cast(pl.Float64).alias("p95_output_tokens"),
    ).with_columns((pl.col("errors") / pl.col("requests")).alias("error_rate"))
    scores = [{**dict(zip(keys, key)), **_reference_scores(group)}
              for key, group in results.group_by(keys, maintain_order=True)]
    schema = {**{k: results.schema[k] for k in keys}, "exact_match": pl.Float64, "chrf": pl.Float64}
    for part in (pl.DataFrame(scores, schema=schema), _choice_scores(results, keys), _perplexities(results, keys)):
        counts = counts.join(part, on=keys, how="left", nulls_equal=True)
    return counts


def compute_adapter_metrics(results: pl.DataFrame, date: str) -> pl.DataFrame:
    """One row per adapter: date, adapter_id, adapter_label, task (the adapter's tasks, comma-joined,
    null without a task column), requests, errors, error_rate, mean/p95 output tokens, exact_match, chrf,
    questions, acc, acc_norm, word_perplexity, token_perplexity."""
    results = _typed(results)
    tasks = (results.filter(pl.col("task").is_not_null()).group_by("adapter_id")
             .agg(pl.col("task").unique().sort().str.join(",")))
    metrics = score_groups(results, ["adapter_id"]).join(tasks, on="adapter_id", how="left", nulls_equal=True)
    return metrics.select(
        pl.lit(date).alias("date"), "adapter_id",
        pl.col("adapter_id").fill_null(BASE_LABEL).alias("adapter_label"), "task",
        "requests", "errors", "error_rate", "mean_output_tokens", "p95_output_tokens", "exact_match", "chrf",
        "questions", "acc", "acc_norm", "word_perplexity", "token_perplexity",
    ).sort("adapter_label")


def compare_with_previous(current: pl.DataFrame, previous: pl.DataFrame | None, margin: float) -> pl.DataFrame:
    """Add prev_date, prev_<m>, delta_<m> (current - previous) for each score, `regressed` and
    `regressed_metrics` (comma-joined names, "" when none). Adapters new tonight have null prev_* and
    are not regressed."""
    if previous is None:
        previous = current.clear()
    # metrics of nights before a score existed lack its column
    current, previous = (frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(m) for m in SCORES
                                            if m not in frame.columns) for frame in (current, previous))
    prev = previous.select(
        "adapter_id", pl.col("date").alias("prev_date"), *[pl.col(m).alias(f"prev_{m}") for m in SCORES])
    out = current.join(prev, on="adapter_id", how="left", nulls_equal=True)
    out = out.with_columns((pl.col(m) - pl.col(f"prev_{m}")).alias(f"delta_{m}") for m in SCORES)
    worse = [(worsening(m) > margin).fill_null(False).alias(m) for m in SCORES]
    names = pl.concat_list([pl.when(w).then(pl.lit(m)) for w, m in zip(worse, SCORES)]).list.drop_nulls()
    return out.with_columns(names.list.len().gt(0).alias("regressed"), names.list.join(",").alias("regressed_metrics"))


def worsening(score: str) -> pl.Expr:
    """How much worse `score` got since the previous night, as a share of its scale (of the previous night's
    value where it has none, as for perplexity): what the regression margin is compared with."""
    delta = pl.col(f"delta_{score}")
    return (-delta if HIGHER_IS_BETTER[score] else delta) / (SCORE_SCALE[score] or pl.col(f"prev_{score}"))


def read_day(fs: fsspec.AbstractFileSystem, folder: str) -> pl.DataFrame | None:
    """Every *.parquet under a folder except `_`/`.`-prefixed ones (run records, temp files)."""
    paths = [p for p in visible_files(fs, folder) if p.endswith(".parquet")] if fs.exists(folder) else []
    if not paths:
        return None
    frames = []
    for path in paths:
        with fs.open(path, "rb") as f:
            frames.append(pl.read_parquet(f))
    return pl.concat(frames, how="diagonal_relaxed")


def _day_folders(fs: fsspec.AbstractFileSystem, pattern: str) -> list[str]:
    """The dates of the `date=YYYY-MM-DD` path components matched by pattern, oldest first."""
    fs.invalidate_cache(pattern.split("/date=")[0])  # another process (or this one) may have written since
    return sorted({part.removeprefix("date=") for p in fs.glob(pattern) for part in p.split("/")
                   if part.startswith("date=")})


def metric_dates(fs: fsspec.AbstractFileSystem, root_path: str) -> list[str]:
    """Nights that have a metrics file, oldest first."""
    return _day_folders(fs, join(root_path, "metrics", "date=*", METRICS_FILE))


def result_dates(fs: fsspec.AbstractFileSystem, root_path: str) -> list[str]:
    """Nights that have result files, oldest first."""
    return _day_folders(fs, join(root_path, "results", "date=*", "*.parquet"))


def read_metrics_file(fs: fsspec.AbstractFileSystem, root_path: str, date: str) -> pl.DataFrame:
    with fs.open(join(metrics_url(root_path, date), METRICS_FILE), "rb") as f:
        return pl.read_parquet(f)


def nightly_metrics(root: str, date: str, *, margin: float = 0.05, storage_options: dict | None = None) -> pl.DataFrame:
    """Score the night's results, compare each adapter with its latest earlier night that has metrics,
    write <root>/metrics/date=D/metrics.parquet (atomically) and return it. A night that ran but had no
    requests (a results folder without result files) gets an empty table."""
    fs, root_path = filesystem(root, storage_options)
    results = read_day(fs, results_url(root_path, date))
    if results is None:
        if not fs.isdir(results_url(root_path, date)):
            raise FileNotFoundError(f"no result files under {results_url(root, date)}")
        results = pl.DataFrame(schema={"request_id": pl.String, "adapter_id": pl.String, "output_text": pl.String,
                                       "output_tokens": pl.Int32, "finish_reason": pl.String})
    earlier = [read_metrics_file(fs, root_path, d) for d in metric_dates(fs, root_path) if d < date]
    previous = (pl.concat(earlier, how="diagonal_relaxed").sort("date")
                .group_by("adapter_id", maintain_order=True).last()) if earlier else None
    metrics = compare_with_previous(compute_adapter_metrics(results, date), previous, margin)
    day = metrics_url(root_path, date)
    buffer = io.BytesIO()
    metrics.write_parquet(buffer)
    publish(fs, join(day, METRICS_FILE), buffer.getvalue(), tmp_dir=day)
    return metrics


def score_unscored_nights(root: str, *, margin: float = 0.05, storage_options: dict | None = None) -> list[str]:
    """Compute the metrics of every night that has results but no metrics yet, oldest first, so each
    compares with the night before it (what `lorafleet report` does for people without Dagster)."""
    fs, root_path = filesystem(root, storage_options)
    unscored = sorted(set(result_dates(fs, root_path)) - set(metric_dates(fs, root_path)))
    for date in unscored:
        nightly_metrics(root, date, margin=margin, storage_options=storage_options)
    return unscored


def read_metrics(url: str, storage_options: dict | None = None) -> pl.DataFrame:
    """Every metrics row under url: `<root>/metrics` for all nights, or one night's folder
    (an empty frame when there are none), sorted by date and adapter."""
    fs, path = filesystem(url, storage_options)
    metrics = read_day(fs, path)
    return pl.DataFrame() if metrics is None else metrics.sort("date", "adapter_label")
