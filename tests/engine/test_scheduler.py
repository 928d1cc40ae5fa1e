"""Scheduler bookkeeping that must stay cheap when a night's queue is long."""
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request
from engine.scheduler import LOOKAHEAD


def test_read_ahead_scans_only_the_head_of_the_queue(llama_fleet):
    """upcoming_adapters runs every step: it must not walk a queue of 100,000 sequences."""
    engine = Engine(EngineConfig(model=str(llama_fleet.model), adapters=str(llama_fleet.adapters),
                                 max_num_seqs=2, cpu_pool_bytes=16 << 20))
    window = LOOKAHEAD * 2
    engine.scheduler._make_resident("r8-qv", set())
    for i in range(window - 1):   # resident or base work fills the window but one place
        engine.add_request(Request(f"head{i}", "r8-qv" if i % 2 else None, prompt_token_ids=[5, 6]))
    for i, adapter_id in enumerate(["r1-q", "r1-q", "r4-regex-kv", "r64-mlp-o"]):
        engine.add_request(Request(f"tail{i}", adapter_id, prompt_token_ids=[5, 6]))
    assert engine.scheduler.upcoming_adapters(3) == ["r1-q"]          # the last place of the window
    engine.scheduler.reject_head()
    engine.scheduler.reject_head()
    assert engine.scheduler.upcoming_adapters(3) == ["r1-q", "r4-regex-kv"]
    assert engine.scheduler.upcoming_adapters(1) == ["r1-q"]
    engine.close()


def test_idle_adapters_are_evicted_only_when_that_makes_room(llama_fleet):
    """Evicting an idle adapter for an adapter that still would not fit costs a reload for nothing."""
    engine = Engine(EngineConfig(model=str(llama_fleet.model), adapters=str(llama_fleet.adapters)))
    sched, pool, adapters = engine.scheduler, engine.runner.pool, engine.runner.adapters
    assert sched._make_resident("r8-qv", set())
    big = engine.adapter_store.get("r64-mlp-o").num_pages
    short = big - adapters.pages_held(["r8-qv"])          # pages still missing once r8-qv is evicted
    assert short > 0
    taken = pool.allocate(pool.num_free - short + 1)       # one page too few, even after evicting
    assert not sched._make_resident("r64-mlp-o", set()) and "r8-qv" in adapters.resident
    pool.free(taken[:1])
    assert sched._make_resident("r64-mlp-o", set()) and list(adapters.resident) == ["r64-mlp-o"]
    engine.close()
