"""Next tokens for a whole batch in one pass on the logits' device: greedy, or temperature / top-k / top-p.

A sampled row draws with the exponential race (Gumbel-max): token = argmax over the kept tokens of
logit / temperature - log(E), with E ~ Exp(1) per token from a counter-based stream keyed by the row's
(seed, position). A row's token so depends only on its logits, its seed and the position of the token being
chosen: not on its batch, the step, or a generator's state, so preemption, resume and batching repeat it.
No row is handled alone on the host, and sample_tokens reads nothing back from the device: parameters come
as per-row tensors, so the whole batch is one pass queued on the step's stream.
"""
from dataclasses import dataclass

import numpy as np
import torch

from engine.request import GREEDY_BELOW

NONFINITE = -1          # the token of a row whose logits hold a NaN or an Inf (ModelRunner.run)
FLOAT32_MAX = torch.finfo(torch.float32).max


def _signed(c: int, bits: int) -> int:
    """An unsigned constant as the signed integer torch holds (multiplication wraps the same)."""
    return c - (1 << bits) if c >= 1 << (bits - 1) else c


# (shift, multiplier) rounds of two integer hashes: SplitMix64's output function (Steele, Lea, Flood 2014)
# makes each row's key; lowbias32 (Wellons, hash-prospector) hashes each token under it, in 32 bits because
# that work is [B, vocab] (half the bytes of 64-bit).
MIX64 = ((30, _signed(0xBF58476D1CE4E5B9, 64)), (27, _signed(0x94D049BB133111EB, 64)), (31, None))
MIX32 = ((16, _signed(0x7FEB352D, 32)), (15, _signed(0x846CA68B, 32)), (16, None))
GOLDEN32 = _signed(0x9E3779B9, 32)


def _mix(z: torch.Tensor, rounds, bits: int) -> torch.Tensor:
    """xorshift-multiply rounds in place on z (int64 or int32 holding unsigned bits); >> sign-extends, so each
    shift is masked to a logical one. One scratch tensor: on CPU a fresh [256, 32000] one costs page faults."""
    scratch = torch.empty_like(z)
    for shift, multiplier in rounds:
        torch.bitwise_right_shift(z, shift, out=scratch)
        scratch &= (1 << (bits - shift)) - 1
        z ^= scratch
        if multiplier is not None:
            z *= multiplier
    return z


def log_exponentials(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(E) [B, vocab], E ~ Exp(1), a function of (seed, position, token) alone: the row's 64-bit key is
    mix64(mix64(seed) + position); token i's bits are lowbias32 of (i * GOLDEN32) ^ the key's low half, with
    the high half xored in after the first round."""
    key = _mix(_mix(seed.clone(), MIX64, 64) + position, MIX64, 64)
    low, high = (((key >> shift) & 0xFFFFFFFF).to(torch.int32) for shift in (0, 32))   # wraps into int32
    tokens = torch.arange(vocab, dtype=torch.int32, device=seed.device).mul_(GOLDEN32)
    z = _mix(tokens[None, :] ^ low[:, None], MIX32[:1], 32)
    z ^= high[:, None]
    z = _mix(z, MIX32[1:], 32)
    z &= 0xFFFFFF                                                       # 24 bits: every float32 in (0, 1)
    uniform = z.to(torch.float32).add_(0.5).mul_(2.0 ** -24)
    return uniform.log_().neg_().log_()


def sorted_descending(x: torch.Tensor) -> torch.Tensor:
    """Each row's values from largest to smallest. On CPU through numpy, whose row sort is ~100x faster than
    torch's (256 x 512: ~0.1 ms against ~10 ms); sorting is exact, so the values are the same either way."""
    if x.device.type == "cpu":
        return torch.from_numpy(-np.sort(-x.numpy(), axis=-1))
    return x.sort(dim=-1, descending=True).values


def drop_below(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """In place: each value of x under its row's threshold [B, 1] becomes about -FLOAT32_MAX, which no softmax
    weighs and no argmax picks. Float arithmetic, not a boolean mask: a masked fill costs ~10x more on CPU."""
    return x.add_((x - threshold).clamp_(max=0).sign_().mul_(FLOAT32_MAX))


def keep_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the least scaled logit a token needs to be kept [B, 1]: top-k first (ties with the k-th kept),
    then the smallest set of the remaining tokens whose probability reaches top_p. A threshold, not a token
    list, so how a sort orders ties changes nothing; the largest logit always stays."""
    vocab = scaled.shape[-1]
    ordered = sorted_descending(scaled)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ordered.gather(1, (k - 1)[:, None])
    mass = drop_below(ordered, kth).softmax(dim=-1).cumsum_(dim=-1)    # non-decreasing: sums of p >= 0
    below = torch.searchsorted(mass, top_p[:, None])                     # how many fall short of top_p
    n_keep = (below + 1).clamp_(max=vocab)                               # the token that reaches top_p stays
    nucleus = ordered.gather(1, n_keep - 1)
    nucleus = torch.where(top_p[:, None] < 1, nucleus, float("-inf"))    # top_p 1: rounding must not cut
    return torch.maximum(kth, nucleus)


# SamplingBatch's tensor fields and their types
SAMPLING_FIELDS = dict(temperature=np.float32, top_k=np.int64, top_p=np.float32, seed=np.int64, position=np.int64)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of a batch where at least one row samples (tensors on the logits' device)."""
    temperature: torch.Tensor    # float32 [B]; below GREEDY_BELOW the row is greedy
    top_k: torch.Tensor          # int64 [B]; 0 = off
    top_p: torch.Tensor          # float32 [B]; 1 = off
    seed: torch.Tensor           # int64 [B]
    position: torch.Tensor       # int64 [B]: index in its sequence of the token being chosen
    truncates: bool              # some row has top_k or top_p < 1 (only then are rows sorted)


def sample_tokens(logits: torch.Tensor, params: SamplingBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (tokens int64 [B], nonfinite bool [B]); params None: every row greedy.

    A row whose logits hold a NaN or an Inf is flagged in `nonfinite` (its token means nothing): the caller
    fails exactly those rows."""
    nonfinite = ~(logits.amax(dim=-1).isfinite() & logits.amin(dim=-1).isfinite())   # both propagate NaN
    if params is None:
        return logits.argmax(dim=-1), nonfinite
    sampled = params.temperature >= GREEDY_BELOW
    scaled = logits / torch.where(sampled, params.temperature, 1.0)[:, None]
    if params.truncates:
        drop_below(scaled, keep_threshold(scaled, params.top_k, params.top_p))
    # greedy rows get no noise: their argmax is the plain one (truncation always keeps the largest logit)
    noise = log_exponentials(params.seed, params.position, logits.shape[-1]).mul_(sampled[:, None])
    return scaled.sub_(noise).argmax(dim=-1), nonfinite
