"""Log-probabilities from the model's logits: of each generated token, and of a scored continuation.

Values are those of the model's raw distribution (a float32 log-softmax of the logits, before temperature,
top-k or top-p), as vLLM returns by default. Logits are computed only at the rows asked for: the last token
of a generating sequence, the positions that predict a scored continuation's tokens (never the whole
prompt), and at most LOGIT_ROWS rows at a time.
"""
from dataclasses import dataclass, field

import numpy as np
import torch

LOGIT_ROWS = 256    # rows of [rows, vocab] float32 logits alive at once while scoring


@dataclass
class TokenLogprobs:
    """Log-probs of a sequence's output tokens (generated, or its scored continuation)."""
    values: list[float] = field(default_factory=list)                 # one per token, when the request asks
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # (token id, log-prob) alternatives of each
    total: float | None = None          # scored: the continuation's summed log-prob (float64)
    is_greedy: bool | None = None       # scored: every continuation token was the argmax


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, top_n: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [n, vocab] and one token id per row [n] -> (the token's log-prob [n] float32, whether it is the
    row's argmax [n] bool, ids [n, top_n] and log-probs [n, top_n] of the row's most likely tokens, best first)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
    top = logprobs.topk(top_n, dim=-1)
    return chosen, logits.argmax(dim=-1) == token_ids, top.indices, top.values


def _top_lists(ids: torch.Tensor, values: torch.Tensor) -> list[list[tuple[int, float]]]:
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


@dataclass
class GeneratedLogprobs:
    """The log-probs of a step's sampled tokens at the batch positions that ask for them, still on the device
    (computed when the step is launched, read when its tokens are)."""
    asked: list[int]                    # batch positions
    top_n: list[int]                    # alternatives each asks for
    chosen: torch.Tensor                # [asked] the token's log-prob
    top_ids: torch.Tensor               # [asked, max top_n]
    top_values: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, tokens: torch.Tensor, top_n: np.ndarray) -> "GeneratedLogprobs | None":
        """logits [B, vocab] each token was sampled from, tokens [B] on the device, top_n [B] (-1: not asked)."""
        asked = np.flatnonzero(top_n >= 0)
        if not asked.size:
            return None
        index = torch.from_numpy(asked).to(logits.device)
        # a NONFINITE token (negative) fails its row: gather anything valid, the row is never recorded
        chosen, _, top_ids, top_values = token_logprobs(logits[index], tokens[index].clamp(min=0),
                                                        int(top_n[asked].max()))
        return cls(asked.tolist(), top_n[asked].tolist(), chosen, top_ids, top_values)

    def record(self, seqs: list, keep: np.ndarray) -> None:
        """Append each asked token's log-prob and alternatives to its sequence (seqs: the step's batch), where
        `keep` [B] says the sequence still takes the token."""
        for i, n, value, top in zip(self.asked, self.top_n, self.chosen.tolist(),
                                    _top_lists(self.top_ids, self.top_values)):
            if keep[i]:
                seqs[i].logprobs.values.append(value)
                seqs[i].logprobs.top.append(top[:n])


def score_continuations(seqs: list, hidden: torch.Tensor, seq_starts: list[int], compute_logits) -> None:
    """Fill in the log-probs of every scored sequence of a prefill batch.

    hidden [T, hidden]: the batch's new tokens, sequence i's from row seq_starts[i] (its first
    num_cached_tokens tokens are not among them). Continuation token k of a sequence sits at position
    num_prompt_tokens + k and is predicted by the hidden state one position before it."""
    scored = [(i, seq) for i, seq in enumerate(seqs) if seq.is_scored]
    if not scored:
        return
    rows, targets = [], []
    for i, seq in scored:
        first = seq_starts[i] + seq.num_prompt_tokens - 1 - seq.num_cached_tokens
        rows += range(first, first + seq.num_scored_tokens)
        targets += seq.token_ids[seq.num_prompt_tokens:]
    top_n = max(seq.request.logprobs or 0 for _, seq in scored)
    rows_t, targets_t = torch.tensor(rows, device=hidden.device), torch.tensor(targets, device=hidden.device)
    parts = [token_logprobs(compute_logits(hidden[rows_t[lo:lo + LOGIT_ROWS]]), targets_t[lo:lo + LOGIT_ROWS], top_n)
             for lo in range(0, len(rows), LOGIT_ROWS)]
    chosen, is_argmax, top_ids, top_values = (torch.cat(p).cpu() for p in zip(*parts))
    lo = 0
    for _, seq in scored:
        hi = lo + seq.num_scored_tokens
        record = seq.logprobs
        record.total = float(chosen[lo:hi].double().sum())
        record.is_greedy = bool(is_argmax[lo:hi].all())
        if seq.request.logprobs is not None:
            record.values = chosen[lo:hi].tolist()
            record.top = [top[:seq.request.logprobs] for top in _top_lists(top_ids[lo:hi], top_values[lo:hi])]
        lo = hi
