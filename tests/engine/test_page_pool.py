"""The unified page pool: KV blocks and adapter rows of mixed ranks share pages, and nothing leaks; an adapter's
pages hold exactly what the old host-side packing put there."""
import io
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from safetensors.torch import save

from engine.adapter_config import PatternMatcher, module_name
from engine.adapter_file import HostBuffers, read_adapter_file
from engine.adapter_memory import ResidentAdapters, adapter_pieces, pack_adapter, row_layout, row_offsets
from engine.model import ModelArgs
from engine.page_pool import PagePool
from kernels import TRITON_OPS

ARGS = ModelArgs("llama", 128, 64, 128, 2, 4, 2, 16, 1e-6, 10000.0, None, 512, False, False, False, False, None)
MODULES = ("q_proj", "v_proj", "down_proj")


def make_pool(num_pages=64):
    return PagePool(num_pages, ARGS.num_layers, 16, ARGS.num_kv_heads, ARGS.head_dim, torch.float32, "cpu")


def random_tensors(rank: int, modules=MODULES, seed=0, dtypes=(torch.float32, torch.float32)) -> dict:
    """PEFT-named lora_A [r, d_in] / lora_B [d_out, r] tensors, A and B in the given dtypes."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(ARGS.num_layers):
        for m in modules:
            d_in, d_out = ARGS.lora_dims(m)
            prefix = f"base_model.model.{module_name(layer, m)}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g).to(dtypes[0])
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g).to(dtypes[1])
    return tensors


def read_file(adapter_id: str, tensors: dict, rank: int, modules=MODULES):
    """An AdapterFile read from the safetensors bytes of `tensors`, as the engine reads a file."""
    raw = save(tensors)
    config = {"r": rank, "lora_alpha": rank / 2, "target_modules": list(modules)}
    return read_adapter_file(io.BytesIO(raw), len(raw), adapter_id, config, ARGS, torch.float32, 64,
                             PatternMatcher(), HostBuffers())


def random_adapter(adapter_id: str, rank: int, seed=0):
    return pack_adapter(read_file(adapter_id, random_tensors(rank, seed=seed), rank), ARGS, make_pool().page_numel, 64)


def old_layout_pages(tensors: dict, page_numel: int) -> torch.Tensor:
    """The pages the old host-side pack_adapter built (checked equal to it before it was removed): for each
    (layer, module) in sorted order, A's rows then B^T's rows, back to back; a row that does not fit the rest
    of a page starts the next page."""
    by_module = {}
    for name, t in tensors.items():
        layer, module = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-3]
        by_module.setdefault((layer, module), {})[name.split(".")[-2]] = t
    page, used, rows = 0, 0, []
    for key in sorted(by_module):
        for t in (by_module[key]["lora_A"], by_module[key]["lora_B"].t()):
            for row in t.float():
                if used + row.numel() > page_numel:
                    page, used = page + 1, 0
                rows.append((page * page_numel + used, row))
                used += row.numel()
    flat = torch.zeros((page + 1 if used else page) * page_numel)
    for offset, row in rows:
        flat[offset: offset + row.numel()] = row
    return flat.view(-1, page_numel)


def test_pages_grow_with_rank_not_with_the_largest_rank():
    pages = {r: row_layout(adapter_pieces(ARGS, {(l, "q_proj"): r for l in range(2)}), make_pool().page_numel)[1]
             for r in (1, 8, 64)}
    assert pages[1] == 1 and pages[8] < pages[64] and pages[64] <= 8 * pages[8]


def test_rows_never_straddle_pages_and_never_overlap():
    pieces = [(5, 64), (7, 128), (3, 64), (9, 128)]
    runs, n = row_layout(pieces, page_numel=500)
    offsets = np.split(row_offsets(runs, pieces), np.cumsum([rows for rows, _ in pieces])[:-1])
    spans = sorted((int(o), int(o) + length) for piece, (_, length) in zip(offsets, pieces) for o in piece)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert all(start // 500 == (end - 1) // 500 for start, end in spans)
    assert n == spans[-1][1] // 500 + 1 and [len(o) for o in offsets] == [5, 7, 3, 9]


@pytest.mark.parametrize("ops", [None, TRITON_OPS], ids=["torch", "triton"])
@pytest.mark.parametrize("rank, modules, dtypes", [
    (1, ("q_proj",), (torch.float32, torch.float32)),
    (7, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), (torch.float32,) * 2),
    (64, ("v_proj", "down_proj"), (torch.float32, torch.float32)),
    (5, ("o_proj", "up_proj"), (torch.float16, torch.float32)),       # two dtypes in one file, cast on load
    (3, ("k_proj", "gate_proj"), (torch.bfloat16, torch.bfloat16)),
])
def test_loaded_pages_equal_the_old_layout(ops, rank, modules, dtypes):
    pool = make_pool(64)
    resident = ResidentAdapters(ARGS, pool, num_slots=2, max_rank=64, device="cpu", ops=ops)
    pool.allocate(3)                                               # the adapter's pages need not start at 0
    tensors = random_tensors(rank, modules, seed=rank, dtypes=dtypes)
    slot = resident.load(pack_adapter(read_file("x", tensors, rank, modules), ARGS, pool.page_numel, 64))
    pages = resident.resident["x"][1]
    torch.testing.assert_close(pool.pages[pages], old_layout_pages(tensors, pool.page_numel), atol=0, rtol=0)
    layer, module = 1, modules[-1]
    group, s = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2), "o_proj": ("o", 0),
                "gate_proj": ("gate_up", 0), "up_proj": ("gate_up", 1), "down_proj": ("down", 0)}[module]
    prefix = f"base_model.model.{module_name(layer, module)}"
    a, b = tensors[f"{prefix}.lora_A.weight"].float(), tensors[f"{prefix}.lora_B.weight"].float()
    rows = resident.a_rows[group][layer, s, slot, :rank]
    assert torch.equal(pool.flat[rows[:, None] + torch.arange(a.shape[1])], a)
    rows = resident.b_rows[group][layer, s, slot, :rank]
    assert torch.equal(pool.flat[rows[:, None] + torch.arange(b.shape[0])], b.t())
    assert resident.ranks[group][layer, s, slot] == rank and resident.scales[group][layer, s, slot] == 0.5


class FakeCuda:
    """Stands in for torch.cuda's streams and events on CPU, recording what a load asks of them."""

    def __init__(self):
        self.log = []
        fake = self

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                fake.log.append(f"{self.name} waits for {other.name}")

        class Event:
            def record(self, stream):
                fake.log.append(f"event recorded on {stream.name}")

            def synchronize(self):
                fake.log.append("event synchronized")

        self.Stream, self.Event, self.main = Stream, Event, Stream("main")

    @contextmanager
    def stream(self, stream):
        self.log.append(f"enter {stream.name}")
        yield
        self.log.append(f"leave {stream.name}")


def test_loads_on_cuda_use_the_side_stream_and_pinned_buffers(monkeypatch):
    """The CUDA-only lines of a load, reached on CPU with torch.cuda's streams and events faked."""
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: fake.main)
    monkeypatch.setattr(torch.cuda, "stream", fake.stream)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    pinned, real_empty, real_zeros = [], torch.empty, torch.zeros
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: (pinned.append(pin_memory),
                                                                            real_empty(*a, **k))[1])
    monkeypatch.setattr(torch, "zeros", lambda *a, pin_memory=False, **k: (pinned.append(pin_memory),
                                                                            real_zeros(*a, **k))[1])
    tensors = random_tensors(8, seed=4)
    raw = save(tensors)
    file = read_adapter_file(io.BytesIO(raw), len(raw), "x", {"r": 8, "lora_alpha": 4, "target_modules": MODULES},
                             ARGS, torch.float32, 64, PatternMatcher(), HostBuffers(pin_memory=True))
    pool = make_pool(64)
    packed = pack_adapter(file, ARGS, pool.page_numel, 64, pin_memory=True)
    assert pinned.count(True) == 2                                 # the weights and the tables: page-locked
    resident = ResidentAdapters(ARGS, pool, num_slots=2, max_rank=64, device="cpu")
    resident.copy_stream = fake.Stream("copy")
    resident.load(packed)
    assert fake.log == ["copy waits for main", "enter copy", "leave copy", "event recorded on copy",
                        "main waits for copy"]
    resident.unload("x")
    fake.log.clear()
    resident.load(packed)                                          # its tables are rewritten: after the last copy
    assert fake.log[0] == "event synchronized"
    torch.testing.assert_close(pool.pages[resident.resident["x"][1]], old_layout_pages(tensors, pool.page_numel))


def test_adapters_of_mixed_ranks_and_kv_blocks_interleave_free_and_reuse():
    pool = make_pool(64)
    resident = ResidentAdapters(ARGS, pool, num_slots=4, max_rank=64, device="cpu")
    kv_a = pool.allocate(3)
    resident.load(random_adapter("small", 2, seed=1))
    kv_b = pool.allocate(2)
    slot_big = resident.load(random_adapter("big", 32, seed=2))
    used_small = set(resident.resident["small"][1])
    assert len(used_small) < len(resident.resident["big"][1])
    assert not used_small & set(kv_a + kv_b) and not set(resident.resident["big"][1]) & set(kv_a + kv_b)
    before, big_pages = pool.num_free, len(resident.resident["big"][1])
    resident.unload("big")
    assert pool.num_free == before + big_pages
    reloaded = resident.load(random_adapter("big2", 32, seed=3))
    assert reloaded == slot_big and resident.loads == 3


class PoolMachine(RuleBasedStateMachine):
    """Random interleavings of KV and adapter allocations: every page is free or owned exactly once."""

    def __init__(self):
        super().__init__()
        self.pool = make_pool(48)
        self.resident = ResidentAdapters(ARGS, self.pool, num_slots=6, max_rank=64, device="cpu")
        self.kv: list[list[int]] = []
        self.counter = 0

    @rule(n=st.integers(1, 6))
    def alloc_kv(self, n):
        if n <= self.pool.num_free:
            self.kv.append(self.pool.allocate(n))

    @precondition(lambda self: self.kv)
    @rule(i=st.integers(0, 100))
    def free_kv(self, i):
        self.pool.free(self.kv.pop(i % len(self.kv)))

    @rule(rank=st.sampled_from([1, 2, 4, 8, 16, 32, 64]))
    def load_adapter(self, rank):
        self.counter += 1
        weights = random_adapter(f"a{self.counter}", rank, seed=self.counter)
        if self.resident.can_load(weights):
            self.resident.load(weights)

    @precondition(lambda self: self.resident.resident)
    @rule(i=st.integers(0, 100))
    def unload_adapter(self, i):
        ids = list(self.resident.resident)
        self.resident.unload(ids[i % len(ids)])

    @invariant()
    def every_page_owned_once(self):
        owned = [p for block in self.kv for p in block] + \
                [p for _, pages, _ in self.resident.resident.values() for p in pages]
        assert len(owned) == len(set(owned)), "a page is double-booked"
        assert set(owned) == self.pool.used
        assert len(self.pool.free_pages) + len(owned) == self.pool.num_pages, "a page leaked"
        assert not set(self.pool.free_pages) & set(owned)


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_pool_never_leaks_or_double_books = PoolMachine.TestCase
