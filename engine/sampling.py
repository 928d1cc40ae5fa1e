"""Next tokens for a whole batch in one pass on the logits' device: greedy, or temperature / top-k / top-p.

A sampled row draws with the exponential race (Gumbel-max): token = argmax over the kept tokens of
logit / temperature - log(E), with E ~ Exp(1) per token from a counter-based stream keyed by the row's
(seed, position). A row's token so depends only on its logits, its seed and the position of the token being
chosen: not on its batch, the step, or a generator's state, so preemption, resume and batching repeat it.
No row is handled alone on the host and nothing here reads the device, so it runs inside the step's stream.
"""
from dataclasses import dataclass

import numpy as np
import torch

from engine.request import GREEDY_BELOW
from engine.sequence import Sequence

NONFINITE = -1          # sample_next_tokens' token for a row whose logits hold a NaN or an Inf


def _int64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch holds (multiplication wraps the same)."""
    return c - (1 << 64) if c >= 1 << 63 else c


# SplitMix64 (Steele, Lea, Flood 2014): the state steps by GOLDEN, each output is the state through _mix.
GOLDEN, MIX1, MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> sign-extends)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function, in place on z (int64)."""
    z ^= _shr(z, 30)
    z *= MIX1
    z ^= _shr(z, 27)
    z *= MIX2
    z ^= _shr(z, 31)
    return z


def log_exponentials(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """log(E) [B, vocab], E ~ Exp(1): token i of row b uses output i + 1 of the SplitMix64 stream started at
    mix(mix(seed[b]) + position[b]), so it depends on (seed, position, i) alone."""
    key = _mix(_mix(seed.clone()) + position)
    z = _mix(key[:, None] + torch.arange(1, vocab + 1, device=seed.device) * GOLDEN)
    uniform = (z & 0xFFFFFF).float().add_(0.5).mul_(2.0 ** -24)       # 24 bits: every float32 in (0, 1)
    return uniform.log_().neg_().log_()


def keep_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row, the least scaled logit a token needs to be kept: top-k first (ties with the k-th kept), then
    the smallest set of the remaining tokens whose probability reaches top_p. A threshold, not a token list,
    so how a sort orders ties changes nothing."""
    vocab = scaled.shape[-1]
    ordered = scaled.sort(dim=-1, descending=True).values
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ordered.gather(1, (k - 1)[:, None])
    ordered.masked_fill_(ordered < kth, float("-inf"))
    reached = ordered.softmax(dim=-1).cumsum_(dim=-1) < top_p[:, None]
    n_keep = (reached.sum(dim=-1) + 1).clamp_(max=vocab)                 # the token that reaches top_p stays
    nucleus = ordered.gather(1, (n_keep - 1)[:, None])
    nucleus = torch.where(top_p[:, None] < 1, nucleus, float("-inf"))    # top_p 1: rounding must not cut
    return torch.maximum(kth, nucleus).squeeze(1)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of a batch where at least one row samples (tensors on the logits' device)."""
    temperature: torch.Tensor    # float32 [B]; below GREEDY_BELOW the row is greedy
    top_k: torch.Tensor          # int64 [B]; 0 = off
    top_p: torch.Tensor          # float32 [B]; 1 = off
    seed: torch.Tensor           # int64 [B]
    position: torch.Tensor       # int64 [B]: index in its sequence of the token being chosen
    truncates: bool              # some row has top_k or top_p < 1 (only then are rows sorted)

    @classmethod
    def of(cls, seqs: list[Sequence], device) -> "SamplingBatch | None":
        """The batch's parameters; None when every row is greedy."""
        params = [seq.sampling for seq in seqs]
        if all(p.greedy for p in params):
            return None

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
        return cls(tensor([p.temperature for p in params], torch.float32),
                   tensor([p.top_k for p in params], torch.int64),
                   tensor([p.top_p for p in params], torch.float32),
                   tensor([seq.seed for seq in seqs], torch.int64),
                   tensor([seq.num_tokens for seq in seqs], torch.int64),
                   any(p.top_k or p.top_p < 1 for p in params if not p.greedy))


def sample_tokens(logits: torch.Tensor, params: SamplingBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (tokens int64 [B], nonfinite bool [B]); params None: every row greedy.

    A row whose logits hold a NaN or an Inf is flagged in `nonfinite` (its token means nothing): the caller
    fails exactly those rows."""
    low, high = logits.aminmax(dim=-1)                                   # both propagate NaN
    nonfinite = ~(low.isfinite() & high.isfinite())
    greedy = logits.argmax(dim=-1)
    if params is None:
        return greedy, nonfinite
    is_greedy = params.temperature < GREEDY_BELOW
    scaled = logits / torch.where(is_greedy, 1.0, params.temperature)[:, None]
    if params.truncates:
        threshold = keep_threshold(scaled, params.top_k, params.top_p)
        scaled.masked_fill_(scaled < threshold[:, None], float("-inf"))
    scores = scaled.sub_(log_exponentials(params.seed, params.position, logits.shape[-1]))
    return torch.where(is_greedy, greedy, scores.argmax(dim=-1)), nonfinite


def sample_next_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> np.ndarray:
    """Each sequence's next token (int64), NONFINITE where its logits were not finite; one read of the device."""
    tokens, nonfinite = sample_tokens(logits, SamplingBatch.of(seqs, logits.device))
    return tokens.masked_fill_(nonfinite, NONFINITE).cpu().numpy()
