"""The planner: each adapter loaded once, every request once, waves within the page budget."""
import json
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.plan import AdapterShard, Plan, PlanBudget, PlanItem, count_adapter_loads, plan_waves, split_by_adapter

TARGET_SETS = [("q", "v"), ("q", "k", "v", "o"), ("q", "k", "v", "o", "gate", "up", "down")]


def fleet(n_adapters: int, n_base: int, seed: int) -> tuple[list[PlanItem], dict[str, int]]:
    """Adapters of mixed ranks and targets (so mixed pages), power-law request counts, shuffled rows."""
    rng = random.Random(seed)
    pages, items = {}, []
    for k in range(n_adapters):
        name = f"adapter-{k:04d}"
        pages[name] = rng.choice([4, 8, 16, 32, 64]) * len(rng.choice(TARGET_SETS)) // 4
        for _ in range(max(2, int(60 / (k + 1) ** 0.5))):
            items.append(PlanItem(f"req-{len(items)}", name, rng.randint(8, 300), rng.randint(1, 128)))
    for _ in range(n_base):
        items.append(PlanItem(f"req-{len(items)}", None, rng.randint(8, 300), rng.randint(1, 128)))
    rng.shuffle(items)
    return items, pages


def check_structure(plan: Plan, items: list[PlanItem], pages: dict[str, int], budget: PlanBudget):
    """What every plan must satisfy, whatever the input."""
    order = plan.request_order()
    assert sorted(order) == sorted(it.request_id for it in items), "every request exactly once"
    adapter_of = {it.request_id: it.adapter_id for it in items}
    assert plan.adapter_sequence() == [adapter_of[r] for r in order]
    est = {it.request_id: it.est_tokens for it in items}
    waves_of = Counter(a for w in plan.waves for a in w.adapter_ids if a is not None)
    assert all(n == 1 for n in waves_of.values()), "each adapter in exactly one wave"
    assert [w.est_tokens for w in plan.waves] == sorted((w.est_tokens for w in plan.waves), reverse=True)
    for i, w in enumerate(plan.waves):
        adapters = [a for a in w.adapter_ids if a is not None]
        group_work, start = [], 0
        for n in w.group_sizes[:len(adapters)]:
            group_work.append(sum(est[r] for r in w.request_ids[start:start + n]))
            start += n
        assert group_work == sorted(group_work, reverse=True), "adapter with the most work first"
        assert w.index == i and w.est_tokens == sum(est[r] for r in w.request_ids)
        assert w.pages == sum(pages.get(a, 0) for a in adapters)
        assert w.pages <= budget.adapter_pages or len(adapters) == 1, "over budget only for one oversize adapter"
        assert len(adapters) <= budget.max_wave_adapters
        assert None not in w.adapter_ids[:-1], "base-model rows come last in a wave"
    assert plan.predicted_adapter_loads() == len(waves_of)
    assert count_adapter_loads(plan.adapter_sequence(), 1) == len(waves_of), "each adapter's rows contiguous"


@pytest.mark.parametrize("room_for", ["8 largest", "8 average"])
def test_300_mixed_rank_adapters_each_loaded_once(room_for):
    items, pages = fleet(300, n_base=200, seed=0)
    size = max(pages.values()) if room_for == "8 largest" else sum(pages.values()) // len(pages)
    budget = PlanBudget(adapter_pages=8 * size, kv_pages=4096, max_active_adapters=8, block_size=16)
    plan = plan_waves(items, pages, budget)
    check_structure(plan, items, pages, budget)

    table_order = [it.adapter_id for it in items]
    naive = count_adapter_loads(table_order, 1)
    fifo_lru = count_adapter_loads(table_order, budget.adapter_pages, pages=pages)
    loads = count_adapter_loads(plan.adapter_sequence(), budget.max_active_adapters)
    message = f"plan {loads} loads vs naive order {naive}, FIFO-LRU {fifo_lru} ({len(items)} requests)"
    assert loads == plan.summary()["predicted_adapter_loads"] == 300, message
    assert naive > fifo_lru > loads, message
    assert plan.baseline_loads == {"naive": naive, "fifo_lru": fifo_lru}
    # Dealing biggest first to the emptiest wave mixes sizes and needs no more waves than pages or slots force.
    total = sum(pages.values())
    fewest = max(math.ceil(total / budget.adapter_pages), math.ceil(300 / budget.max_wave_adapters))
    assert len(plan.waves) == fewest, f"{len(plan.waves)} waves for {total} pages"
    assert all(len({pages[a] for a in w.adapter_ids if a}) > 2 for w in plan.waves), "big and small together"


def test_plan_does_not_depend_on_row_order():
    items, pages = fleet(50, n_base=30, seed=1)
    budget = PlanBudget(adapter_pages=64, kv_pages=512, max_active_adapters=4, block_size=16)
    first = plan_waves(items, pages, budget)
    random.Random(7).shuffle(items)
    assert plan_waves(items, pages, budget).request_order() == first.request_order()


def test_oversize_adapter_gets_a_wave_of_its_own_and_a_note():
    items = [PlanItem(f"r{i}", a, 10, 10) for i, a in enumerate(["big", "small", "big", "tiny", None])]
    plan = plan_waves(items, {"big": 50, "small": 6, "tiny": 4}, PlanBudget(10, 100, 2, 16))
    big = [w for w in plan.waves if "big" in w.adapter_ids]
    assert len(big) == 1 and [a for a in big[0].adapter_ids if a] == ["big"] and big[0].pages == 50
    assert any("big" in n and "wave of its own" in n for n in plan.notes)
    assert any(w.adapter_ids[:2] == ["small", "tiny"] and w.pages == 10 for w in plan.waves)


def test_wave_holds_at_most_a_few_times_the_active_adapters():
    items = [PlanItem(f"r{i}", f"a{i}", 5, 5) for i in range(40)]
    budget = PlanBudget(adapter_pages=1000, kv_pages=100, max_active_adapters=2, block_size=16)
    plan = plan_waves(items, {f"a{i}": 1 for i in range(40)}, budget)
    assert [len(w.adapter_ids) for w in plan.waves] == [8] * 5


def test_requests_grouped_by_adapter_longest_work_first():
    items = ([PlanItem(f"a-{i}", "a", 10, 10 * i) for i in range(3)]          # 20 + 30 + 40 = 90 tokens
             + [PlanItem(f"b-{i}", "b", 100, 100) for i in range(2)]          # 400 tokens
             + [PlanItem(f"c-{i}", "c", 1, 1) for i in range(4)]              # 8 tokens
             + [PlanItem("base-0", None, 500, 500)])
    plan = plan_waves(items, {"a": 1, "b": 1, "c": 1}, PlanBudget(10, 100, 4, 16))
    (wave,) = plan.waves
    assert wave.adapter_ids == ["b", "a", "c", None]
    assert wave.group_sizes == [2, 3, 4, 1]
    assert wave.request_ids == ["b-0", "b-1", "a-2", "a-1", "a-0", "c-0", "c-1", "c-2", "c-3", "base-0"]


def test_base_rows_fill_the_lightest_waves():
    # Three adapters that each fill the budget: three waves carrying 1000, 100 and 100 tokens.
    items = [PlanItem("heavy", "h", 500, 500), PlanItem("light-1", "l1", 50, 50), PlanItem("light-2", "l2", 50, 50)]
    items += [PlanItem(f"base-{i}", None, 5, 5) for i in range(150)]                 # 1500 tokens in all
    plan = plan_waves(items, {"h": 8, "l1": 8, "l2": 8}, PlanBudget(8, 100, 1, 16))
    heavy, light_1, light_2 = plan.waves
    assert heavy.adapter_ids == ["h"] and heavy.est_tokens == 1000
    assert light_1.group_sizes[1] + light_2.group_sizes[1] == 150
    assert abs(light_1.est_tokens - light_2.est_tokens) <= 10 and light_1.est_tokens >= 800


def test_unknown_adapter_and_too_long_request_are_noted_not_fatal():
    items = [PlanItem("r0", "known", 10, 10), PlanItem("r1", "lost", 10, 10), PlanItem("r2", None, 4000, 100)]
    budget = PlanBudget(adapter_pages=4, kv_pages=64, max_active_adapters=2, block_size=16)
    plan = plan_waves(items, {"known": 3}, budget)
    assert sorted(plan.request_order()) == ["r0", "r1", "r2"]
    assert any("lost" in n and "0 pages" in n for n in plan.notes)
    assert "requests needing more KV pages than the pool's 64: 1" in plan.notes


def test_duplicate_request_ids_are_refused():
    with pytest.raises(ValueError, match="unique"):
        plan_waves([PlanItem("r", "a", 1, 1), PlanItem("r", "b", 1, 1)], {"a": 1, "b": 1}, PlanBudget(4, 4, 1, 16))


def test_budget_is_validated():
    with pytest.raises(ValueError, match="max_active_adapters"):
        PlanBudget(adapter_pages=4, kv_pages=4, max_active_adapters=0, block_size=16)


def test_empty_plan():
    plan = plan_waves([], {}, PlanBudget(4, 4, 1, 16))
    assert plan.waves == [] and plan.request_order() == []
    assert plan.summary()["requests"] == 0 and "predicted adapter loads: 0" in plan.format_table()


def test_json_round_trip_and_table():
    items, pages = fleet(40, n_base=10, seed=2)
    plan = plan_waves(items, pages, PlanBudget(adapter_pages=96, kv_pages=2048, max_active_adapters=4, block_size=16))
    assert Plan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["summary"] == plan.summary()
    lines = plan.format_table().splitlines()
    s = plan.summary()
    assert lines[0].split()[:5] == ["wave", "adapters", "requests", "est", "tokens"]
    assert len(lines) == 1 + len(plan.waves) + 3 + len(plan.notes)
    total, loads = lines[1 + len(plan.waves):3 + len(plan.waves)]
    assert total.split()[:4] == ["total", "40", f"{s['requests']:,}", f"{s['est_tokens']:,}"]
    assert f"naive {s['naive_loads']:,}" in loads and f"FIFO-LRU {s['fifo_lru_loads']:,}" in loads


def test_table_lists_as_many_adapters_as_it_counts():
    """The base model is no adapter: a wave's adapter count and its list of adapter ids agree, with the
    base-model rows named apart (a wave of 5 adapters and base rows once listed 6 names beside `5`)."""
    items = [PlanItem(f"r{i}", [f"a{k}" for k in range(5)][i % 5] if i % 6 else None, 8, 4) for i in range(60)]
    plan = plan_waves(items, {f"a{k}": 1 for k in range(5)}, PlanBudget(64, 512, 8, 16))
    [wave] = plan.format_table().splitlines()[1:2]
    count, names = int(wave.split()[1]), wave.split("  ")[-1]
    listed, base = names.split("; ")
    shown = listed.split(", ")
    more = int(shown.pop()[len("… (+"):-1]) if shown[-1].startswith("…") else 0
    assert count == 5 == len(shown) + more and "base" not in listed
    assert base == "10 base-model requests"


def test_count_adapter_loads_is_lru():
    seq = ["a", "b", None, "a", "c", "b"]
    assert count_adapter_loads(seq, 1) == 5
    assert count_adapter_loads(seq, 2) == 4      # c evicts b (least recent), b then evicts a
    assert count_adapter_loads(seq, 3) == 3
    assert count_adapter_loads(seq, 3, pages={"a": 2, "b": 1, "c": 1}) == 4
    assert count_adapter_loads(["a", "b", "a"], 3, pages={"a": 5, "b": 1}) == 3   # oversize a evicts all


names = st.sampled_from([None] + [f"a{i}" for i in range(12)])
rows = st.lists(st.tuples(names, st.integers(0, 400), st.integers(0, 200)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(rows=rows, sizes=st.dictionaries(st.sampled_from([f"a{i}" for i in range(12)]), st.integers(0, 40)),
       adapter_pages=st.integers(1, 48), kv_pages=st.integers(1, 64), active=st.integers(1, 4),
       block=st.sampled_from([1, 16]))
def test_any_plan_is_well_formed(rows, sizes, adapter_pages, kv_pages, active, block):
    items = [PlanItem(f"r{i}", a, p, m) for i, (a, p, m) in enumerate(rows)]
    budget = PlanBudget(adapter_pages, kv_pages, active, block)
    plan = plan_waves(items, sizes, budget)
    check_structure(plan, items, sizes, budget)
    table_order = [it.adapter_id for it in items]
    assert plan.predicted_adapter_loads() <= min(plan.baseline_loads.values())
    assert plan.baseline_loads["naive"] == count_adapter_loads(table_order, 1)
    # No two waves could merge: forced at the lower bound on waves, and never seen broken beyond it.
    for i, w in enumerate(plan.waves):
        for v in plan.waves[i + 1:]:
            n = sum(a is not None for a in w.adapter_ids + v.adapter_ids)
            assert w.pages + v.pages > adapter_pages or n > budget.max_wave_adapters, (w, v)


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_adapter_shards_are_disjoint_balanced_and_independent_of_row_order(count):
    items, _ = fleet(60, n_base=40, seed=4)
    parts = split_by_adapter(items, count)
    assert sorted(it.request_id for p in parts for it in p) == sorted(it.request_id for it in items)
    parts_of = Counter(a for a, _ in {(it.adapter_id, i) for i, p in enumerate(parts) for it in p} if a is not None)
    assert set(parts_of.values()) == {1}, "each adapter in exactly one part"
    work = [sum(it.est_tokens for it in p) for p in parts]
    biggest = max(sum(it.est_tokens for it in items if it.adapter_id == a) for a in {it.adapter_id for it in items})
    assert max(work) - min(work) <= biggest, work      # greedy by work: within one adapter's work
    shuffled = random.Random(1).sample(items, len(items))
    assert [sorted(it.request_id for it in p) for p in split_by_adapter(shuffled, count)] == \
        [sorted(it.request_id for it in p) for p in parts]
    assert [AdapterShard(i, count).select(items) for i in range(count)] == (parts if count > 1 else [items])


def test_adapter_shard_parse_and_tag():
    assert AdapterShard.parse("2/4") == AdapterShard(2, 4) and AdapterShard(2, 4).tag == "s2of4"
    assert AdapterShard().tag == "" and AdapterShard.parse("0/1").tag == ""
    for bad in ("4/4", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(ValueError, match="adapter shard"):
            AdapterShard.parse(bad)
