"""The batched sampler: a row's token depends on its logits, seed and position alone; the distributions it
draws from are the asked ones; top-k/top-p edge cases; non-finite rows are flagged alone; no host sync."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.request import Request, SamplingParams
from engine.running_batch import RunningBatch
from engine.sampling import NONFINITE, SamplingBatch, log_exponentials, sample_tokens, sorted_descending
from engine.sequence import Sequence
from tests.engine.test_cuda_graphs import NoHostSync

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def params(n: int, temperature=1.0, top_k=0, top_p=1.0, seed=None, position=7) -> SamplingBatch:
    full = lambda v, dtype: torch.full((n,), v, dtype=dtype) if not torch.is_tensor(v) else v.to(dtype)  # noqa
    seeds = torch.arange(n) if seed is None else full(seed, torch.int64)
    return SamplingBatch(full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
                         seeds, full(position, torch.int64), truncates=True)


def mixed_batch(n: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, SamplingBatch]:
    """Random logits (with ties) and a mix of greedy, temperature, top-k and top-p rows."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 3).round(decimals=1)      # rounding makes ties
    kind = torch.arange(n) % 5
    temperature = torch.where(kind == 0, 0.0, torch.rand(n, generator=g) * 1.5 + 0.1)
    top_k = torch.where(kind == 2, torch.randint(1, vocab + 5, (n,), generator=g), 0)
    top_p = torch.where(kind >= 3, torch.rand(n, generator=g) * 0.99 + 0.01, 1.0)
    seeds = torch.randint(-2**63, 2**63 - 1, (n,), generator=g)
    return logits, params(n, temperature, top_k, top_p, seeds, torch.randint(0, 4000, (n,), generator=g))


def sample_sequences(logits: torch.Tensor, seqs: list[Sequence]) -> np.ndarray:
    """What the engine samples for these sequences: their rows' parameters from a RunningBatch (seed, position
    = the token count), then sample_tokens; NONFINITE where the logits are not."""
    running = RunningBatch(len(seqs), 1, SimpleNamespace(block_size=16))
    for seq in seqs:
        running.add(seq, -1)
    sampling = running.sampling(running.rows_of(seqs))
    batch = None if sampling is None else \
        SamplingBatch(**{name: torch.from_numpy(values) for name, values in sampling[0].items()}, truncates=sampling[1])
    tokens, nonfinite = sample_tokens(logits, batch)
    return tokens.masked_fill_(nonfinite, NONFINITE).numpy()


def rows(p: SamplingBatch, index) -> SamplingBatch:
    return SamplingBatch(p.temperature[index], p.top_k[index], p.top_p[index], p.seed[index], p.position[index],
                         p.truncates)


def test_a_row_draws_the_same_token_alone_in_any_batch_and_order():
    logits, p = mixed_batch(300, 97)
    together, _ = sample_tokens(logits, p)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(1))
    shuffled, _ = sample_tokens(logits[order], rows(p, order))
    assert torch.equal(shuffled, together[order])
    for i in range(0, 300, 7):
        alone, _ = sample_tokens(logits[i:i + 1], rows(p, slice(i, i + 1)))
        assert int(alone) == int(together[i]), i
    greedy_rows = p.temperature < 1e-5
    assert torch.equal(together[greedy_rows], logits[greedy_rows].argmax(-1))


def test_the_stream_is_keyed_by_seed_and_position():
    seeds, positions = torch.tensor([1, 1, 2, -1]), torch.tensor([5, 6, 5, 5])
    draws = log_exponentials(seeds, positions, 1000)
    assert torch.equal(draws, log_exponentials(seeds.clone(), positions.clone(), 1000))
    for a in range(4):
        for b in range(a):
            assert not torch.equal(draws[a], draws[b])
    exponentials = torch.exp(log_exponentials(torch.arange(100), torch.zeros(100, dtype=torch.int64), 1000))
    assert abs(exponentials.mean().item() - 1) < 0.02 and abs(exponentials.var().item() - 1) < 0.05


def frequencies(logits_row: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    tokens, _ = sample_tokens(logits_row.expand(n, -1).contiguous(), params(n, **kwargs))
    return torch.bincount(tokens, minlength=logits_row.numel()).float() / n


def normalized(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum()


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), PROBS),
    (dict(temperature=2.0), normalized(PROBS ** 0.5)),
    (dict(temperature=0.5), normalized(PROBS ** 2)),
    (dict(top_k=2), normalized(PROBS * torch.tensor([1, 1, 0, 0]))),
    (dict(top_p=0.7), normalized(PROBS * torch.tensor([1, 1, 0, 0]))),
    (dict(top_p=0.85), normalized(PROBS * torch.tensor([1, 1, 1, 0]))),
    (dict(top_k=3, top_p=0.9), normalized(PROBS * torch.tensor([1, 1, 1, 0]))),   # top-p over the top-3 mass
    (dict(temperature=2.0, top_p=0.6), normalized(PROBS ** 0.5 * torch.tensor([1, 1, 0, 0]))),
    (dict(seed=7, position=torch.arange(20_000)), PROBS),                       # one row's stream over time
], ids=["plain", "hot", "cold", "top-k", "top-p", "top-p-3", "top-k-then-p", "hot-top-p", "positions"])
def test_frequencies_follow_the_asked_distribution(kwargs, expected):
    observed = frequencies(PROBS.log(), 20_000, **kwargs)
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)       # ~4 standard errors


def test_ties_at_the_kth_value_are_all_kept():
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0])
    observed = frequencies(logits, 6000, top_k=1)
    assert observed[[0, 4]].sum() == 0 and (observed[1:4] > 0.25).all()


def test_top_p_tiny_is_the_top_token_and_top_k_beyond_the_vocabulary_is_off():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3)) * 3     # no ties
    tokens, _ = sample_tokens(logits, params(64, temperature=1.3, top_p=1e-9))
    assert torch.equal(tokens, logits.argmax(-1))
    off, _ = sample_tokens(logits, params(64, temperature=1.3))
    beyond, _ = sample_tokens(logits, params(64, temperature=1.3, top_k=51))
    huge, _ = sample_tokens(logits, params(64, temperature=1.3, top_k=10**9, top_p=1.0))
    assert torch.equal(off, beyond) and torch.equal(off, huge)
    assert not torch.equal(off, logits.argmax(-1))                              # it does sample


def test_untruncated_batches_skip_the_sort_and_draw_the_same_tokens():
    logits, _ = mixed_batch(40, 30, seed=4)
    p = params(40, temperature=0.8)
    unsorted = SamplingBatch(p.temperature, p.top_k, p.top_p, p.seed, p.position, truncates=False)
    assert torch.equal(sample_tokens(logits, p)[0], sample_tokens(logits, unsorted)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_rows_are_flagged_alone_greedy_and_sampled(bad):
    logits, p = mixed_batch(20, 40, seed=5)
    clean, flags = sample_tokens(logits, p)
    assert not flags.any()
    poisoned = logits.clone()
    poisoned[[0, 3, 11], [5, 0, 39]] = bad          # row 0 greedy, rows 3 and 11 sampled
    tokens, flags = sample_tokens(poisoned, p)
    assert flags.nonzero().flatten().tolist() == [0, 3, 11]
    assert torch.equal(tokens[~flags], clean[~flags])
    greedy_tokens, greedy_flags = sample_tokens(poisoned, None)
    assert torch.equal(greedy_flags, flags)


def test_the_running_batch_gives_each_row_its_parameters_and_nonfinite_rows_are_marked():
    def seq(temperature, seed, prompt):
        request = Request("x", None, prompt_token_ids=prompt, sampling=SamplingParams(temperature=temperature))
        return Sequence(request, prompt, 4, seed)
    logits = torch.randn(4, 30)
    logits[2, 0] = float("nan")
    seqs = [seq(0.0, 1, [1]), seq(1.0, 2**64 + 5, [1, 2]), seq(1.0, 9, [3]), seq(0.7, -3, [4, 4, 4])]
    tokens = sample_sequences(logits, seqs)
    assert tokens.dtype == np.int64 and tokens[0] == int(logits[0].argmax()) and tokens[2] == NONFINITE
    expected, _ = sample_tokens(logits, params(4, torch.tensor([0.0, 1.0, 1.0, 0.7]), 0, 1.0,
                                               torch.tensor([1, 5, 9, -3]), torch.tensor([1, 2, 1, 3])))
    assert tokens[[1, 3]].tolist() == expected[[1, 3]].tolist()
    assert RunningBatch(1, 1, SimpleNamespace(block_size=16)).sampling(np.array([], np.int64)) is None


def test_sampling_reads_nothing_back_from_the_device():
    logits, p = mixed_batch(16, 64, seed=6)
    with NoHostSync():
        sample_tokens(logits, p)
        sample_tokens(logits, None)


def test_the_cpu_sort_gives_torch_sort_values():
    x = (torch.randn(50, 300, generator=torch.Generator().manual_seed(7)) * 3).round(decimals=1)
    x[3, :40] = float("-inf")
    assert torch.equal(sorted_descending(x), x.sort(dim=-1, descending=True).values)
    assert sorted_descending(torch.empty(3, 5, device="meta")).shape == (3, 5)        # the device path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_draws_the_cpu_tokens():
    logits, p = mixed_batch(300, 97)
    on_gpu = SamplingBatch(p.temperature.cuda(), p.top_k.cuda(), p.top_p.cuda(), p.seed.cuda(), p.position.cuda(),
                           p.truncates)
    assert torch.equal(sample_tokens(logits.cuda(), on_gpu)[0].cpu(), sample_tokens(logits, p)[0])
