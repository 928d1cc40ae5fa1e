"""Hundreds of adapters through a pool with room for eight: each is loaded once, outputs unchanged."""
import random

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import EngineConfig
from pipeline.plan import count_adapter_loads
from pipeline.run import run_requests
from tests.checkpoints import write_peft_adapter

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_300_adapters_with_room_for_8_load_each_once(llama_fleet, tmp_path):
    rng = random.Random(0)
    adapter_ids = [f"ad{i:03d}" for i in range(300)]
    for i, adapter_id in enumerate(adapter_ids):
        write_peft_adapter(tmp_path / "adapters" / adapter_id, 64, 128, 2, 32, rank=rng.choice([1, 2, 4, 8, 16, 32]),
                           targets=rng.sample(MODULES, rng.randint(1, 7)), alpha=16, seed=i)
    rows = [{"request_id": f"q{i:04d}", "adapter_id": rng.choice(adapter_ids + [None] * 10),
             "prompt_token_ids": [rng.randrange(4, 124) for _ in range(rng.randint(2, 8))]}
            for i in range(700)]
    rng.shuffle(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "requests.parquet")
    distinct = len({r["adapter_id"] for r in rows} - {None})

    def run(name, **limits):
        config = EngineConfig(model=str(llama_fleet.model), adapters=str(tmp_path / "adapters"),
                              default_max_new_tokens=3, cpu_pool_bytes=32 << 20, **limits)
        summary = run_requests(config, str(tmp_path / "requests.parquet"), str(tmp_path / name), progress=False)
        return summary, pl.read_parquet(f"{tmp_path / name}/*.parquet").sort("request_id")

    tight, tight_rows = run("tight", max_active_adapters=8, max_resident_adapters=8)
    roomy, roomy_rows = run("roomy", max_active_adapters=64, max_resident_adapters=320)
    naive = count_adapter_loads([r["adapter_id"] for r in rows], 1)
    fifo_lru = count_adapter_loads([r["adapter_id"] for r in rows], 8)
    assert tight.adapter_loads == distinct, \
        f"loads: planned {tight.adapter_loads}, distinct {distinct}, naive {naive}, FIFO-LRU {fifo_lru}"
    assert naive > fifo_lru > tight.adapter_loads
    assert tight.rows_ok == roomy.rows_ok == 700 and tight.mean_adapters_per_decode_step <= 8
    assert tight_rows["output_token_ids"].to_list() == roomy_rows["output_token_ids"].to_list()
