"""acc, acc_norm and perplexity on a hand-built result table whose answers are known, and their place in the
night-over-night regression table."""
import math

import polars as pl
import pytest

from pipeline.evaluation.metrics import compare_with_previous, compute_adapter_metrics, score_groups

COLUMNS = {"request_id": pl.String, "adapter_id": pl.String, "output_text": pl.String, "output_tokens": pl.Int32,
           "finish_reason": pl.String, "continuation_logprob": pl.Float64, "continuation_tokens": pl.Int32,
           "choice_group": pl.String, "choice_label": pl.String, "gold": pl.String, "reference": pl.String,
           "task": pl.String}


def choice(adapter, group, label, gold, text, logprob, task="mc") -> tuple:
    failed = logprob is None
    return (adapter, None if failed else text, 0 if failed else 2, "error" if failed else "scored", logprob,
            None if failed else 2, group, label, gold, None, task)


def scored(adapter, text, logprob, tokens, reference=None, task="ppl") -> tuple:
    return adapter, text, tokens, "scored", logprob, tokens, None, None, None, reference, task


def generated(adapter, text, reference, tokens, task="gen") -> tuple:
    return adapter, text, tokens, "stop", None, None, None, None, None, reference, task


ROWS = [
    # q1: both pick B (gold)
    choice("a", "q1", "A", "B", " x", -5.0), choice("a", "q1", "B", "B", " yy", -3.0),
    choice("a", "q1", "C", "B", " zz", -4.0),
    # q2: the raw sum prefers the short B; per byte the long A (gold) wins
    choice("a", "q2", "B", "A", " no", -4.0), choice("a", "q2", "A", "A", " long answer", -6.0),
    # q3: its gold choice failed: wrong for both, though the others score lower
    choice("a", "q3", "A", "C", " p", -9.0), choice("a", "q3", "B", "C", " q", -8.0),
    choice("a", "q3", "C", "C", None, None),
    # q4: no gold: not a question
    choice("a", "q4", "A", None, " r", -1.0), choice("a", "q4", "B", None, " s", -2.0),
    # perplexity rows: 3 + 3 words (re.split counts the empty piece before a leading space), 4 + 5 tokens
    scored("a", "one two three", -6.0, 4), scored("a", " four  five", -3.0, 5, reference=" four  five"),
    # the only generated row with a reference: exact match counts it alone
    generated("a", "wrong", "right", 7),
    # the base on q1: a tie between A and B goes to A (first label), gold is B
    choice(None, "q1", "B", "B", " yy", -2.0), choice(None, "q1", "A", "B", " xx", -2.0),
    generated(None, "right", "right", 3),
]


def night(rows=ROWS) -> pl.DataFrame:
    return pl.DataFrame([(f"r{i}", *row) for i, row in enumerate(rows)], schema=COLUMNS, orient="row")


def test_multiple_choice_and_perplexity_per_adapter():
    m = {row["adapter_label"]: row for row in compute_adapter_metrics(night(), "2026-03-01").iter_rows(named=True)}
    assert (m["a"]["questions"], m["a"]["acc"], m["a"]["acc_norm"]) == (3, pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert (m["<base>"]["questions"], m["<base>"]["acc"], m["<base>"]["acc_norm"]) == (1, 0.0, 0.0)
    assert m["a"]["word_perplexity"] == pytest.approx(math.exp(9 / 6))
    assert m["a"]["token_perplexity"] == pytest.approx(math.exp(9 / 9))
    assert m["<base>"]["word_perplexity"] is None and m["<base>"]["token_perplexity"] is None
    # reference scores and token counts read generated rows only
    assert m["a"]["exact_match"] == 0.0 and m["<base>"]["exact_match"] == 1.0
    assert m["a"]["mean_output_tokens"] == 7.0 and m["<base>"]["mean_output_tokens"] == 3.0
    assert (m["a"]["requests"], m["a"]["errors"]) == (13, 1)


def test_scores_per_adapter_and_task():
    by = {(r["adapter_id"], r["task"]): r for r in score_groups(night(), ["adapter_id", "task"]).iter_rows(named=True)}
    assert by[("a", "mc")]["acc"] == pytest.approx(1 / 3) and by[("a", "mc")]["word_perplexity"] is None
    assert by[("a", "ppl")]["acc"] is None and by[("a", "ppl")]["token_perplexity"] == pytest.approx(math.e)
    assert by[("a", "gen")]["exact_match"] == 0.0 and by[("a", "gen")]["questions"] is None


def test_integer_labels_and_gold_compare_as_strings_and_questions_are_per_adapter():
    rows = [("a", "q1", 0, 1, " x", -5.0), ("a", "q1", 1, 1, " y", -1.0),
            ("b", "q1", 0, 1, " x", -1.0), ("b", "q1", 1, 1, " y", -5.0)]   # the same question id, two adapters
    frame = pl.DataFrame([(f"r{i}", a, text, 2, "scored", lp, 2, g, label, gold)
                          for i, (a, g, label, gold, text, lp) in enumerate(rows)],
                         schema={**{k: COLUMNS[k] for k in list(COLUMNS)[:8]}, "choice_label": pl.Int64,
                                 "gold": pl.Int64}, orient="row")
    m = compute_adapter_metrics(frame, "2026-03-01")
    assert m.select("adapter_label", "questions", "acc").rows() == [("a", 1, 1.0), ("b", 1, 0.0)]
    assert m["exact_match"].to_list() == [None, None]


def metrics_row(adapter_id, acc, token_ppl, date) -> dict:
    return dict(date=date, adapter_id=adapter_id, exact_match=0.5, chrf=50.0, error_rate=0.0, acc=acc, acc_norm=acc,
                word_perplexity=token_ppl, token_perplexity=token_ppl)


def test_drops_in_acc_and_rises_in_perplexity_are_regressions():
    previous = pl.DataFrame([metrics_row("steady", 0.80, 10.0, "2026-03-01"),
                             metrics_row("acc_drop", 0.80, 10.0, "2026-03-01"),
                             metrics_row("ppl_up", 0.80, 10.0, "2026-03-01")])
    current = pl.DataFrame([metrics_row("steady", 0.76, 10.4, "2026-03-02"),     # within 0.05 and 5%
                            metrics_row("acc_drop", 0.70, 10.0, "2026-03-02"),
                            metrics_row("ppl_up", 0.80, 11.0, "2026-03-02")])
    out = {r["adapter_id"]: r for r in compare_with_previous(current, previous, margin=0.05).iter_rows(named=True)}
    assert out["steady"]["regressed_metrics"] == ""
    assert out["acc_drop"]["regressed_metrics"] == "acc,acc_norm"
    assert out["ppl_up"]["regressed_metrics"] == "word_perplexity,token_perplexity"
    assert out["acc_drop"]["delta_acc"] == pytest.approx(-0.10)


def test_a_night_scored_before_these_metrics_existed_compares_without_them():
    old = pl.DataFrame([dict(date="2026-03-01", adapter_id="a", exact_match=0.9, chrf=80.0, error_rate=0.0)])
    current = compute_adapter_metrics(night(), "2026-03-02")
    out = compare_with_previous(current, old, margin=0.05).filter(pl.col("adapter_id") == "a")
    assert out["prev_acc"].to_list() == [None] and out["regressed_metrics"].to_list() == ["exact_match,chrf,error_rate"]
