"""The unified page pool: KV blocks and adapter rows of mixed ranks share pages, and nothing leaks."""
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.adapter_memory import ResidentAdapters, adapter_pieces, pack_adapter, row_layout
from engine.adapters import AdapterWeights
from engine.model import ModelArgs
from engine.page_pool import PagePool

ARGS = ModelArgs("llama", 128, 64, 128, 2, 4, 2, 16, 1e-6, 10000.0, None, 512, False, False, False, False, None)


def make_pool(num_pages=64):
    return PagePool(num_pages, ARGS.num_layers, 16, ARGS.num_kv_heads, ARGS.head_dim, torch.float32, "cpu")


def random_weights(adapter_id: str, rank: int, modules=("q_proj", "v_proj", "down_proj"), seed=0) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(ARGS.num_layers):
        for m in modules:
            d_in, d_out = ARGS.lora_dims(m)
            weights[(layer, m)] = (torch.randn(rank, d_in, generator=g), torch.randn(rank, d_out, generator=g), 0.5)
    return AdapterWeights(adapter_id, adapter_id, 0, weights)


def random_adapter(adapter_id: str, rank: int, seed=0):
    return pack_adapter(random_weights(adapter_id, rank, seed=seed), ARGS, make_pool().page_numel, 64)


def test_pages_grow_with_rank_not_with_the_largest_rank():
    pages = {r: row_layout(adapter_pieces(ARGS, {(l, "q_proj"): r for l in range(2)}), make_pool().page_numel)[1]
             for r in (1, 8, 64)}
    assert pages[1] == 1 and pages[8] < pages[64] and pages[64] <= 8 * pages[8]


def test_rows_never_straddle_pages_and_never_overlap():
    offsets, n = row_layout([(5, 64), (7, 128), (3, 64), (9, 128)], page_numel=500)
    spans = sorted((int(o), int(o) + length) for piece, length in zip(offsets, (64, 128, 64, 128)) for o in piece)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert all(start // 500 == (end - 1) // 500 for start, end in spans)
    assert n == spans[-1][1] // 500 + 1


def test_adapters_of_mixed_ranks_and_kv_blocks_interleave_free_and_reuse():
    pool = make_pool(64)
    resident = ResidentAdapters(ARGS, pool, num_slots=4, max_rank=64, device="cpu")
    kv_a = pool.allocate(3)
    small = random_weights("small", 2, seed=1)
    big = random_weights("big", 32, seed=2)
    slot_small = resident.load(pack_adapter(small, ARGS, pool.page_numel, 64))
    kv_b = pool.allocate(2)
    slot_big = resident.load(pack_adapter(big, ARGS, pool.page_numel, 64))
    used_small = set(resident.resident["small"][1])
    assert len(used_small) < len(resident.resident["big"][1])
    assert not used_small & set(kv_a + kv_b) and not set(resident.resident["big"][1]) & set(kv_a + kv_b)
    # The rows read back through the tables are the adapter's own.
    for adapter, slot in ((small, slot_small), (big, slot_big)):
        a_t, b, _ = adapter.modules[(1, "down_proj")]
        r = a_t.shape[0]
        rows = resident.a_rows["down"][1, 0, slot, :r]
        torch.testing.assert_close(pool.flat[rows[:, None] + torch.arange(a_t.shape[1])], a_t)
        rows = resident.b_rows["down"][1, 0, slot, :r]
        torch.testing.assert_close(pool.flat[rows[:, None] + torch.arange(b.shape[1])], b)
        assert resident.ranks["qkv"][0, 0, slot] == r and resident.ranks["qkv"][0, 1, slot] == 0   # q yes, k no
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
