"""Shared prefix pages in the page pool: holder counts, idle pages taken back on demand, pages of a batch that
never ran forgotten; and random interleavings that never leak, double-book or share a page wrongly."""
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.page_pool import PagePool
from engine.prefix_cache import prefix_keys, siblings_together
from engine.request import Request
from engine.sequence import Sequence

BLOCK = 4


def make_pool(num_pages=16) -> PagePool:
    return PagePool(num_pages, 1, BLOCK, 1, 8, torch.float32, "cpu")


def scored(prompt: list[int], continuation=(7,), adapter="a") -> Sequence:
    seq = Sequence(Request("r", adapter), prompt, 0, 0, list(continuation))
    seq.prefix_keys = prefix_keys(adapter, prompt, BLOCK)
    return seq


def test_keys_cover_full_pages_before_the_last_prompt_token_and_depend_on_adapter_and_every_token():
    assert len(prefix_keys("a", list(range(8)), BLOCK)) == 1      # the second page holds the last token
    assert len(prefix_keys("a", list(range(9)), BLOCK)) == 2
    assert prefix_keys("a", list(range(3)), BLOCK) == []
    keys = prefix_keys("a", list(range(9)), BLOCK)
    assert prefix_keys("b", list(range(9)), BLOCK) != keys and prefix_keys(None, list(range(9)), BLOCK) != keys
    assert prefix_keys("a", [9] + list(range(1, 9)), BLOCK)[1] != keys[1]   # a later page keys its whole prefix


def test_siblings_share_pages_and_the_last_holder_frees_them():
    pool = make_pool()
    first, second = scored(list(range(10))), scored(list(range(10)), (8, 9))
    other = scored(list(range(10)), adapter="b")
    for seq in (first, second, other):
        assert pool.can_allocate_kv(seq)
        pool.allocate_kv(seq)
    assert second.block_table[:2] == first.block_table[:2] and second.num_cached_tokens == 2 * BLOCK
    assert first.num_cached_tokens == other.num_cached_tokens == 0
    assert not set(other.block_table) & set(first.block_table)
    assert len(pool.used) == 3 + 1 + 3
    pool.prefix_cache.mark_computed()
    pool.free_kv(first)
    assert set(second.block_table) <= pool.used
    pool.free_kv(second)
    assert len(pool.prefix_cache.idle) == 2 and pool.num_free == 16 - 3   # idle pages count as free
    late = scored(list(range(10)), (5,))
    idle_before = pool.num_free
    pool.allocate_kv(late)                           # a sibling in a later batch finds the idle pages
    assert late.num_cached_tokens == 2 * BLOCK and pool.num_free == idle_before - 3


def test_idle_pages_are_taken_back_least_recently_released_first():
    pool = make_pool(8)
    a, b = scored(list(range(9))), scored(list(range(20, 29)))
    pool.allocate_kv(a)
    pool.allocate_kv(b)
    pool.prefix_cache.mark_computed()
    pool.free_kv(a)
    pool.free_kv(b)
    assert pool.num_free == 8 and len(pool.prefix_cache.idle) == 4
    pool.allocate(5)                                  # the 4 free pages, then a's first idle one
    assert pool.prefix_cache.lookup(a.prefix_keys) == [] and len(pool.prefix_cache.page_of) == 3
    pool.allocate(1)
    assert len(pool.prefix_cache.lookup(b.prefix_keys)) == 2 and len(pool.prefix_cache.page_of) == 2
    assert pool.num_free == 2


def test_pages_never_computed_are_forgotten():
    pool = make_pool()
    a, b = scored(list(range(9))), scored(list(range(9)), (1, 2))
    pool.allocate_kv(a)
    pool.allocate_kv(b)                               # shares a's pending pages, in the same batch
    assert b.num_cached_tokens == 2 * BLOCK
    pool.free_kv(a)                                   # the batch failed before it ran
    pool.free_kv(b)
    assert not pool.prefix_cache.page_of and not pool.prefix_cache.idle and pool.num_free == 16
    assert len(pool.free_pages) == 16


def test_siblings_are_queued_together_at_the_first_ones_place():
    seqs = [scored(list(range(9))), scored([1, 2]), scored(list(range(20, 29))), scored(list(range(9)), (3,))]
    plain = Sequence(Request("g", None), [1, 2, 3], 4, 0)
    assert siblings_together(seqs + [plain]) == [seqs[0], seqs[3], seqs[1], seqs[2], plain]


PROMPTS = [list(range(9)), list(range(9)) + [50, 51, 52, 53], list(range(30, 43)), [60, 61, 62]]


class SharingMachine(RuleBasedStateMachine):
    """Sequences of a few shared prompts come and go in prefill batches that run or fail, beside adapter
    allocations: each page is free, idle or used, once; a used page has one holder per block table (or
    adapter) that lists it; a keyed page is shared only after it was computed or inside its own batch."""

    def __init__(self):
        super().__init__()
        self.pool = make_pool(24)
        self.running: list[Sequence] = []
        self.batch: list[Sequence] = []          # allocated, not yet run
        self.adapters: list[list[int]] = []

    @rule(prompt=st.sampled_from(PROMPTS), adapter=st.sampled_from(["a", "b"]), cont=st.integers(1, 6))
    def admit(self, prompt, adapter, cont):
        seq = scored(prompt, [5] * cont, adapter)
        if self.pool.can_allocate_kv(seq):
            self.pool.allocate_kv(seq)
            self.batch.append(seq)

    @rule(ran=st.booleans())
    def step(self, ran):
        if ran:
            self.pool.prefix_cache.mark_computed()
            self.running += self.batch
        else:
            for seq in self.batch:
                self.pool.free_kv(seq)
        self.batch = []

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        self.pool.free_kv(self.running.pop(i % len(self.running)))

    @rule(n=st.integers(1, 4))
    def load_adapter(self, n):
        if n <= self.pool.num_free:
            self.adapters.append(self.pool.allocate(n))

    @precondition(lambda self: self.adapters)
    @rule(i=st.integers(0, 100))
    def unload_adapter(self, i):
        self.pool.free(self.adapters.pop(i % len(self.adapters)))

    @invariant()
    def pages_accounted_once(self):
        pool, cache = self.pool, self.pool.prefix_cache
        holders = [p for seq in self.running + self.batch for p in seq.block_table] + \
                  [p for pages in self.adapters for p in pages]
        assert set(holders) == pool.used
        assert all(holders.count(p) == 1 + pool.sharers[p] for p in pool.used)
        free, idle = set(pool.free_pages), set(cache.idle)
        assert len(free) == len(pool.free_pages) and not free & idle and not (free | idle) & pool.used
        assert len(free) + len(idle) + len(pool.used) == pool.num_pages
        assert idle <= set(cache.key_of) and cache.pending <= pool.used
        assert all(cache.key_of[page] == key for key, page in cache.page_of.items())
        assert not any(p in cache.key_of for pages in self.adapters for p in pages)

    @invariant()
    def shared_pages_hold_their_prefix(self):
        for seq in self.running + self.batch:
            n_shared = seq.num_cached_tokens // BLOCK
            assert n_shared <= len(seq.prefix_keys)
            for key, page in zip(seq.prefix_keys[:n_shared], seq.block_table):
                assert self.pool.prefix_cache.key_of.get(page) == key


SharingMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_sharing_never_leaks_or_double_books = SharingMachine.TestCase
