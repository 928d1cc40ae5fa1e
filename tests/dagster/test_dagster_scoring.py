"""Scored rows through Dagster: two nights of multiple-choice questions materialized in process; the second
night's gold labels name choices the adapters do not pick, so acc drops and `no_regressions` fails on it."""
import dagster as dg
import polars as pl

from dagster_project.assets import adapter_metrics, generations, inference_plan, requests
from dagster_project.checks import every_request_has_one_result, no_regressions
from dagster_project.resources import LorafleetResource
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request
from fleet_tables import ADAPTER_IDS, DATES, write_requests

LABELS = "ABCD"
PROMPTS = [[1, 5, 6, 7, 8], [1, 9, 10, 11, 12, 13, 14]]
CHOICES = [[20], [21, 22], [23], [24, 25, 26]]


def predicted_labels(fleet) -> dict[tuple[str, int], str]:
    """The label each adapter picks per question (the largest continuation_logprob), from the engine itself."""
    engine = Engine(EngineConfig(model=str(fleet.model), adapters=str(fleet.adapters), cpu_pool_bytes=16 << 20))
    outputs = engine.generate([Request(f"{a}|{q}|{label}", a, prompt_token_ids=prompt, continuation_token_ids=choice)
                               for a in ADAPTER_IDS for q, prompt in enumerate(PROMPTS)
                               for label, choice in zip(LABELS, CHOICES)])
    best: dict[tuple[str, int], tuple[float, str]] = {}
    for o in outputs:
        a, q, label = o.request_id.split("|")
        best[a, int(q)] = max(best.get((a, int(q)), (float("-inf"), "")), (o.continuation_logprob, label))
    return {key: label for key, (_, label) in best.items()}


def night_rows(gold: dict[tuple[str, int], str]) -> list[dict]:
    return [{"request_id": f"{a}/{q}/{label}", "adapter_id": a, "prompt_token_ids": prompt,
             "continuation_token_ids": choice, "choice_group": f"q{q}", "choice_label": label, "gold": gold[a, q],
             "logprobs": 1, "task": "mc"}
            for a in ADAPTER_IDS for q, prompt in enumerate(PROMPTS) for label, choice in zip(LABELS, CHOICES)]


def test_multiple_choice_nights_materialize_and_a_drop_in_acc_fails_the_check(tmp_path, llama_fleet):
    picked = predicted_labels(llama_fleet)
    missed = {key: LABELS[(LABELS.index(label) + 1) % 4] for key, label in picked.items()}
    for date, gold in zip(DATES, (picked, missed)):
        write_requests(tmp_path, date, night_rows(gold))
    lorafleet = LorafleetResource(root=str(tmp_path), model=str(llama_fleet.model),
                                  adapters=str(llama_fleet.adapters))
    with dg.instance_for_test() as instance:
        passed = {}
        for date in DATES:
            result = dg.materialize([requests, inference_plan, generations, adapter_metrics,
                                     every_request_has_one_result, no_regressions], partition_key=date,
                                    resources={"lorafleet": lorafleet}, instance=instance)
            assert result.success
            passed[date] = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
            [asked] = result.asset_materializations_for_node("requests")
            assert asked.metadata["scored_rows"].value == 16
            [scores] = result.asset_materializations_for_node("adapter_metrics")
            assert {"acc", "acc_norm"} <= {c.name for c in scores.metadata["worst_adapters"].schema.columns}
    assert passed == {DATES[0]: {"every_request_has_one_result": True, "no_regressions": True},
                      DATES[1]: {"every_request_has_one_result": True, "no_regressions": False}}
    metrics = pl.read_parquet(f"{tmp_path}/metrics/**/*.parquet", hive_partitioning=True).sort("date", "adapter_label")
    assert metrics.select("adapter_label", "questions", "acc").rows() == [(a, 2, 1.0) for a in sorted(ADAPTER_IDS)] \
        + [(a, 2, 0.0) for a in sorted(ADAPTER_IDS)]
    assert set(metrics.filter("regressed")["regressed_metrics"].str.split(",").explode()) >= {"acc"}
