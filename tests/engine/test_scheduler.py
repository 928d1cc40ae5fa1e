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
