"""Next-token choice per sequence: greedy, or temperature / top-k / top-p with the sequence's own generator."""
import torch

from engine.sequence import Sequence


def sample_next_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [B, V] float32, one row per sequence. Each row is sampled alone, so a row's token never
    depends on what it was batched with."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        params = seq.sampling
        if params.greedy:
            continue
        row = logits[i].float().cpu() / params.temperature
        if params.top_k:
            kth = torch.topk(row, min(params.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = row.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= params.top_p   # keep the smallest set reaching top_p
            row = row.scatter(0, order[drop], float("-inf"))
        tokens[i] = int(torch.multinomial(row.softmax(-1), 1, generator=seq.generator))
    return tokens
