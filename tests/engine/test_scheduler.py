"""Scheduler bookkeeping that must stay cheap when a night's queue is long."""
from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request, SamplingParams
from engine.scheduler import LOOKAHEAD, READ_AHEAD_ADAPTERS


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


def test_reads_go_on_while_the_batch_is_full(llama_fleet):
    """Every step names the queue's next adapters to the store, decode steps with a full batch included, and a
    queue that did not move is not scanned again."""
    engine = Engine(EngineConfig(model=str(llama_fleet.model), adapters=str(llama_fleet.adapters),
                                 max_num_seqs=2, cpu_pool_bytes=16 << 20))
    engine.tokenizer.eos_token_ids = set()
    for i, adapter_id in enumerate(["r8-qv", "r8-qv", "r1-q", "r4-regex-kv"]):
        engine.add_request(Request(f"q{i}", adapter_id, prompt_token_ids=[5, 6],
                                   sampling=SamplingParams(max_new_tokens=4)))
    sched, store = engine.scheduler, engine.adapter_store
    engine.step()                                          # prefill of the two r8-qv requests: the batch is full
    first = sched.upcoming_adapters(READ_AHEAD_ADAPTERS)
    assert first == ["r1-q", "r4-regex-kv"] and sched.upcoming_adapters(READ_AHEAD_ADAPTERS) is first
    engine.step()                                          # a decode step
    assert len(sched.running) == 2 and {"r1-q", "r4-regex-kv"} <= set(store._ahead) | set(store._cache)
    while not sched.is_finished():
        engine.step()
    assert engine.stats.adapter_reads == 3 and engine.stats.adapter_bytes_read > 0
    engine.close()
