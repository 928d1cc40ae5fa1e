"""The LoRA tile table: each adapter's run of tokens cut into tiles, base-model tokens in none."""
import numpy as np
import pytest
import torch

from engine.lora import LoraWorkspace, lora_tiles, max_decode_tiles


def test_runs_are_cut_into_tiles_and_base_rows_get_none():
    slots = [-1, -1, 3, 3, 3, 3, 3, -1, 0, 2, 2]
    assert lora_tiles(slots, 2).tolist() == [[3, 2, 2], [3, 4, 2], [3, 6, 1], [0, 8, 1], [2, 9, 2]]
    assert lora_tiles([-1, -1], 16).shape == (0, 3) and lora_tiles([], 16).shape == (0, 3)
    assert lora_tiles([5] * 40, 16).tolist() == [[5, 0, 16], [5, 16, 16], [5, 32, 8]]


@pytest.mark.parametrize("seed", range(5))
def test_tiles_cover_every_adapter_token_once_within_the_worst_case_bound(seed):
    rng = np.random.default_rng(seed)
    adapters = int(rng.integers(1, 9))
    slots = np.sort(rng.integers(-1, adapters, size=int(rng.integers(1, 300))))
    tiles = lora_tiles(slots, 16)
    covered = np.concatenate([np.arange(first, first + count) for _, first, count in tiles]) if len(tiles) else []
    assert sorted(covered) == np.flatnonzero(slots >= 0).tolist()
    assert all(1 <= count <= 16 and (slots[first:first + count] == slot).all() for slot, first, count in tiles)
    assert len(tiles) <= max_decode_tiles(len(slots), adapters)


def test_the_workspace_grows_but_never_shrinks_or_reallocates_for_a_smaller_batch():
    workspace = LoraWorkspace("cpu")
    big = workspace.xa(4, 3, 64, 16)
    assert big.shape == (4, 3, 64, 16) and big.dtype == torch.float32
    buffer = workspace.buffer
    small = workspace.xa(2, 1, 10, 16)
    assert workspace.buffer is buffer and small.data_ptr() == buffer.data_ptr()
