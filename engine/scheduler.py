"""Continuous batching over mixed adapters: decides each step's batch, loads and evicts adapters, preempts.

Policy, in short:
- at most `max_active_adapters` distinct adapters among running sequences (hence in any batch);
- new work prefers adapters already active, then takes the waiting queue in order (the planner's order);
- adapters with no running sequence stay resident until their pages are needed, then go least recently
  used first, those with no waiting work before those with some; idle adapters are evicted before any
  running sequence is preempted;
- when KV pages run out during decode, the sequence last in the running batch's adapter-slot order is
  preempted and later recomputed;
- no time slice (DESIGN): an active adapter keeps its place until its queue drains. Offline, the planner's
  order already decides who goes first, and a slice would only add reloads.
"""
from collections import Counter, deque
from itertools import islice

from engine.adapter_memory import ResidentAdapters
from engine.adapters import AdapterError, AdapterStore
from engine.config import EngineConfig
from engine.page_pool import PagePool
from engine.running_batch import RunningBatch
from engine.sequence import Sequence, SequenceStatus

LOOKAHEAD = 4  # waiting sequences scanned per free batch place when looking for admissible work
READ_AHEAD_ADAPTERS = 64   # adapters named to the store's read-ahead; its byte budget decides how many it reads


class Scheduler:
    def __init__(self, config: EngineConfig, pool: PagePool, adapters: ResidentAdapters, store: AdapterStore,
                 max_blocks: int):
        """max_blocks: KV blocks of the longest sequence the engine admits."""
        self.max_num_seqs, self.max_batched_tokens = config.max_num_seqs, config.max_num_batched_tokens
        self.max_active = config.max_active_adapters
        self.pool, self.adapters, self.store = pool, adapters, store
        self.waiting: deque[Sequence] = deque()
        self.running = RunningBatch(config.max_num_seqs, max_blocks, pool)
        self.failed: list[tuple[Sequence, str]] = []   # sequences whose adapter could not be loaded
        self.waiting_per_adapter: Counter[str | None] = Counter()
        self.preemptions = 0
        self._upcoming_key, self._upcoming = None, []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.waiting_per_adapter[seq.adapter_id] += 1

    def _leave_waiting(self, seq: Sequence) -> None:
        self.waiting_per_adapter[seq.adapter_id] -= 1

    def reject_head(self) -> Sequence:
        """Take the first waiting sequence out for good (it can never be admitted)."""
        seq = self.waiting.popleft()
        self._leave_waiting(seq)
        return seq

    def is_finished(self) -> bool:
        return not self.waiting and not len(self.running)

    def active_adapters(self) -> set[str]:
        return set(self.running.adapters)

    def read_ahead(self) -> None:
        """Have the store read the adapters the queue needs next, every step, decode steps included, so
        reads go on while the batch is full. The queue is the plan's order, so its head is the next wave."""
        self.store.prefetch(self.upcoming_adapters(READ_AHEAD_ADAPTERS))

    def upcoming_adapters(self, n: int) -> list[str]:
        """The next n distinct adapters in the waiting queue that are not resident (for read-ahead).

        Only the head of the queue is scanned (as far as prefill looks), and only when the queue's head or
        length, or the resident set, changed since the last scan: this runs every step, and a night's queue
        can hold 100,000 sequences of adapters already resident."""
        key = (n, len(self.waiting), id(self.waiting[0]) if self.waiting else None, self.adapters.loads,
               len(self.adapters.resident))
        if key == self._upcoming_key:
            return self._upcoming
        upcoming = []
        for seq in islice(self.waiting, LOOKAHEAD * self.max_num_seqs):
            a = seq.adapter_id
            if a is not None and a not in self.adapters.resident and a not in upcoming:
                upcoming.append(a)
                if len(upcoming) == n:
                    break
        self._upcoming_key, self._upcoming = key, upcoming
        return upcoming

    def _make_resident(self, adapter_id: str, active: set[str]) -> bool:
        """Load an adapter, evicting idle ones (least recently used first) to make room."""
        if adapter_id in self.adapters.resident:
            self.adapters.touch(adapter_id)
            return True
        packed = self.store.get(adapter_id)   # AdapterError propagates to the caller
        idle = self._idle(active)
        if not self._room_after_evicting(idle, packed.num_pages) or not (self.adapters.free_slots or idle):
            return False
        while not self.adapters.can_load(packed):
            self._evict_idle(active)
        self.adapters.load(packed)
        return True

    def _idle(self, active: set[str]) -> list[str]:
        return [a for a in self.adapters.resident if a not in active]   # resident is in LRU order

    def _room_after_evicting(self, idle: list[str], pages: int) -> bool:
        """Whether evicting the idle adapters would free `pages`: never evict for nothing, since an
        evicted adapter with waiting work must be loaded again."""
        return pages <= self.pool.num_free + self.adapters.pages_held(idle)

    def _evict_idle(self, active: set[str]) -> bool:
        """Unload the least recently used idle adapter, preferring one with no waiting work."""
        idle = self._idle(active)
        if not idle:
            return False
        self.adapters.unload(min(idle, key=lambda a: self.waiting_per_adapter[a] > 0))
        return True

    def schedule(self) -> tuple[list[Sequence], bool]:
        batch = self._schedule_prefill()
        if batch:
            return batch, True
        return self._schedule_decode(), False

    def _schedule_prefill(self) -> list[Sequence]:
        batch, skipped, tokens = [], [], 0
        active = self.active_adapters()
        limit = LOOKAHEAD * self.max_num_seqs
        while self.waiting and len(self.running) < self.max_num_seqs and len(skipped) < limit:
            seq = self.waiting.popleft()
            a = seq.adapter_id
            if a is not None and a not in active and len(active) >= self.max_active:
                skipped.append(seq)   # look further for work of adapters already active
                continue
            if batch and tokens + seq.num_tokens > self.max_batched_tokens:
                self.waiting.appendleft(seq)
                break
            if a is not None:
                try:
                    resident = self._make_resident(a, active)
                except AdapterError as e:
                    self._leave_waiting(seq)
                    self.failed.append((seq, str(e)))
                    continue
                if not resident:
                    self.waiting.appendleft(seq)
                    break
            if not self._room_after_evicting(self._idle(active | {a}), self.pool.blocks_needed(seq.num_tokens)):
                self.waiting.appendleft(seq)
                break
            while not self.pool.can_allocate_kv(seq):
                self._evict_idle(active | {a})
            if a is not None:
                active.add(a)
            self._leave_waiting(seq)
            self.pool.allocate_kv(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.add(seq, self._slot(seq))
            batch.append(seq)
            tokens += seq.num_tokens
        self.waiting.extendleft(reversed(skipped))
        return sorted(batch, key=self._slot)

    def _schedule_decode(self) -> list[Sequence]:
        """The running sequences of a decode step (RunningBatch.decode_rows), once each has a KV block for its
        newest token: idle adapters are evicted, then the sequences last in order preempted, while the pool has
        too few free pages for that."""
        running = self.running
        while len(running):
            rows, seqs, _ = running.decode_rows()
            needed = running.kv_blocks_needed(rows)
            if len(needed) <= self.pool.num_free:
                running.grow_kv(needed)
                return seqs
            if not self._evict_idle(self.active_adapters()):
                self.preempt(seqs[-1])
        return []

    def _slot(self, seq: Sequence) -> int:
        """Batches are in adapter slot order: each adapter's tokens are one run, which the LoRA kernels cut
        into tiles. A running sequence's adapter keeps its slot (active adapters are never evicted)."""
        return -1 if seq.adapter_id is None else self.adapters.slot(seq.adapter_id)

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV and put it first in line; it is recomputed from its tokens later."""
        seq.preemptions += 1
        self.preemptions += 1
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_kv(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.waiting_per_adapter[seq.adapter_id] += 1

    def back_off(self, batch: list[Sequence], is_prefill: bool) -> None:
        """The device ran out of memory on `batch`: lower the batch limits to half the batch and put sequences
        back in line (recomputed later, so outputs do not change): all of a prefill batch, the back half of a
        decode one. The limits stay lowered for the rest of the run."""
        self.max_num_seqs = max(1, len(batch) // 2)
        if is_prefill:
            self.max_batched_tokens = max(1, min(self.max_batched_tokens, sum(s.num_tokens for s in batch) // 2))
        for seq in reversed(batch if is_prefill else batch[self.max_num_seqs:]):
            if is_prefill:   # a prefill that never ran is put back as it was (its prompt not yet counted)
                self._requeue(seq)
            else:
                self.preempt(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free_kv(seq)
        seq.status = SequenceStatus.FINISHED
