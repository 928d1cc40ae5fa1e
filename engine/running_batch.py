"""The running sequences as arrays, so a step costs the host no Python work per sequence.

A sequence takes a row of these arrays when it is admitted and gives it back when it stops running (rows
are reused). The Sequence stays the owner of its tokens and its KV block table; while it runs, this class
is their only writer (it appends the sampled tokens, and the KV blocks their K/V needs), so the arrays
never drift from it. A decode batch is the running rows in adapter-slot order: each adapter's tokens are
then one run for the LoRA kernels' tiles. That order is recomputed only when a sequence joins or leaves.

`num_tokens` counts a token from the moment its step is launched (`advance`); the token itself reaches the
sequence when the host reads it (`append_tokens`), which with overlapped steps is one step later. The
device keeps each row's newest token (ModelRunner.row_tokens), so the next step does not wait for it.
"""
from collections import Counter
from itertools import compress

import numpy as np

from engine.lora import DECODE_TILE, lora_tiles
from engine.page_pool import PagePool
from engine.request import GREEDY_BELOW
from engine.sequence import Sequence


class RunningBatch:
    def __init__(self, max_seqs: int, max_blocks: int, pool: PagePool):
        self.pool, self.block_size = pool, pool.block_size
        self.seqs: list[Sequence | None] = [None] * max_seqs          # by row
        self.free_rows = list(range(max_seqs - 1, -1, -1))
        self.num_tokens = np.zeros(max_seqs, np.int64)                # launched tokens (see the module docstring)
        self.num_blocks = np.zeros(max_seqs, np.int64)
        self.max_tokens = np.zeros(max_seqs, np.int64)                # prompt + max_new_tokens: done at that length
        self.has_stop = np.zeros(max_seqs, bool)                       # has stop strings to look for
        self.logprobs = np.full(max_seqs, -1, np.int64)               # top-N log-probs asked (-1: none)
        self.temperature = np.zeros(max_seqs, np.float32)
        self.top_k = np.zeros(max_seqs, np.int64)
        self.top_p = np.ones(max_seqs, np.float32)
        self.seed = np.zeros(max_seqs, np.int64)
        self.adapter_slot = np.full(max_seqs, -1, np.int32)          # -1 = base model
        self.block_tables = np.zeros((max_seqs, max_blocks), np.int32)
        self.epoch = np.zeros(max_seqs, np.int64)                     # bumped when a row's sequence stops running
        self.adapters: Counter[str] = Counter()                       # running sequences per adapter
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.seqs) - len(self.free_rows)

    def __iter__(self):
        self.order()
        return iter(self._ordered_seqs)

    def add(self, seq: Sequence, adapter_slot: int) -> None:
        """Take a row for a sequence whose prompt KV blocks are allocated (it runs from now on)."""
        row = seq.row = self.free_rows.pop()
        self.seqs[row] = seq
        self.num_tokens[row] = seq.num_tokens
        self.num_blocks[row] = len(seq.block_table)
        self.block_tables[row, :len(seq.block_table)] = seq.block_table
        self.max_tokens[row] = seq.num_prompt_tokens + seq.max_new_tokens
        params = seq.sampling
        self.has_stop[row] = bool(params.stop)
        self.logprobs[row] = -1 if seq.request.logprobs is None or seq.is_scored else seq.request.logprobs
        self.temperature[row], self.top_k[row], self.top_p[row] = params.temperature, params.top_k, params.top_p
        self.seed[row] = seq.seed
        self.adapter_slot[row] = adapter_slot
        if seq.adapter_id is not None:
            self.adapters[seq.adapter_id] += 1
        self._order = None

    def remove(self, seq: Sequence) -> None:
        row = seq.row
        assert self.seqs[row] is seq, f"{seq.request_id} is not running"
        self.seqs[row], seq.row = None, None
        self.epoch[row] += 1
        self.free_rows.append(row)
        if seq.adapter_id is not None:
            self.adapters[seq.adapter_id] -= 1
            if not self.adapters[seq.adapter_id]:
                del self.adapters[seq.adapter_id]
        self._order = None

    def order(self) -> np.ndarray:
        """Rows of the running sequences in adapter-slot order (base-model rows first)."""
        if self._order is None:
            rows = np.array([row for row, seq in enumerate(self.seqs) if seq is not None], np.int64)
            self._order = rows[np.argsort(self.adapter_slot[rows], kind="stable")]
            self._ordered_seqs = [self.seqs[row] for row in self._order.tolist()]
            self._tiles = lora_tiles(self.adapter_slot[self._order], DECODE_TILE)
        return self._order

    def decode_rows(self) -> tuple[np.ndarray, list[Sequence], np.ndarray]:
        """Rows, sequences and LoRA tiles of a decode step: the running ones in order(), but those whose last
        token is already launched (done by length: with overlapped steps they finish when it is read)."""
        rows = self.order()
        live = self.num_tokens[rows] < self.max_tokens[rows]
        if live.all():
            return rows, self._ordered_seqs, self._tiles
        rows = rows[live]
        return rows, list(compress(self._ordered_seqs, live)), lora_tiles(self.adapter_slot[rows], DECODE_TILE)

    def rows_of(self, seqs: list[Sequence]) -> np.ndarray:
        return np.fromiter((seq.row for seq in seqs), np.int64, len(seqs))

    def sampling(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], bool] | None:
        """The sampling parameters of `rows` for their next token, with the position of that token
        (engine.sampling.SamplingBatch's fields), and whether any sampled row truncates (top-k or top-p);
        None when every row is greedy."""
        temperature = self.temperature[rows]
        sampled = temperature >= GREEDY_BELOW
        if not sampled.any():
            return None
        top_k, top_p = self.top_k[rows], self.top_p[rows]
        truncates = bool(((top_k > 0) | (top_p < 1))[sampled].any())
        return dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=self.seed[rows],
                    position=self.num_tokens[rows]), truncates

    def advance(self, rows: np.ndarray) -> np.ndarray:
        """A step that samples the next token of `rows` is launched; returns their token counts with it."""
        self.num_tokens[rows] += 1
        return self.num_tokens[rows]

    @staticmethod
    def append_tokens(seqs: list[Sequence], tokens: np.ndarray) -> None:
        """Each sequence's sampled token, read back from the device, appended to it."""
        for seq, token in zip(seqs, tokens.tolist()):
            seq.token_ids.append(token)

    def kv_blocks_needed(self, rows: np.ndarray) -> np.ndarray:
        """Those of `rows` whose newest token has no KV block yet."""
        return rows[self.num_tokens[rows] > self.num_blocks[rows] * self.block_size]

    def grow_kv(self, rows: np.ndarray) -> None:
        """One more KV block for each of `rows` (see kv_blocks_needed); the pool must have them free."""
        pages = self.pool.allocate(len(rows))
        for row, page in zip(rows.tolist(), pages):
            self.seqs[row].block_table.append(page)
        self.block_tables[rows, self.num_blocks[rows]] = pages
        self.num_blocks[rows] += 1

    def decode_inputs(self, rows: np.ndarray, tiles: np.ndarray) -> dict[str, np.ndarray]:
        """What a decode step over `rows` (decode_rows) reads: the rows (their newest tokens are on the device),
        each token's position, the KV slot it writes, the context length, the block tables, the LoRA tiles."""
        num_tokens = self.num_tokens[rows]
        positions = num_tokens - 1
        tables = self.block_tables[rows, :int(self.num_blocks[rows].max())]
        pages = tables[np.arange(len(rows)), positions // self.block_size]
        return dict(rows=rows, positions=positions, slot_mapping=pages * self.block_size + positions % self.block_size,
                    context_lens=num_tokens, block_tables=tables, tiles=tiles)
