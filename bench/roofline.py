"""The memory roofline of a decode step, and measured decode steps held against it.

A decode step must read every weight of the model once (the embedding only gathers a row per token,
so it is left out), the K and V of every token in the batch's contexts, and the rows of every
distinct adapter in the batch. At batch sizes that fit a GPU the step is bound by those bytes over
the memory bandwidth, not by FLOPs.
"""
import time
from dataclasses import dataclass

import torch

from bench.workload import lora_bytes_per_rank
from engine.model import Transformer


@dataclass
class DecodeRoofline:
    weight_bytes: int
    kv_bytes_per_token: int
    adapter_bytes: dict[str, int]      # adapter id -> bytes of its rows
    bandwidth: float                   # bytes/s

    @classmethod
    def of(cls, model: Transformer, adapter_ranks: dict[str, int], bandwidth: float) -> "DecodeRoofline":
        args = model.args
        size = model.lm_head.weight.element_size()
        weights = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed_tokens"))
        per_rank = lora_bytes_per_rank(args, size)
        return cls(weights * size, 2 * args.num_layers * args.num_kv_heads * args.head_dim * size,
                   {a: r * per_rank for a, r in adapter_ranks.items()}, bandwidth)

    def seconds(self, context_tokens: int, adapter_ids) -> float:
        """The least time a decode step over these contexts and adapters can take."""
        adapters = sum(self.adapter_bytes[a] for a in set(adapter_ids) if a is not None)
        return (self.weight_bytes + context_tokens * self.kv_bytes_per_token + adapters) / self.bandwidth


@dataclass
class DecodeTiming:
    """Measured decode steps against their roofline, in all and for batches of BIG_BATCH or more."""
    BIG_BATCH = 64
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    roofline_s: float = 0.0
    big_seconds: float = 0.0
    big_roofline_s: float = 0.0

    def add(self, batch: int, seconds: float, roofline_s: float) -> None:
        self.steps += 1
        self.tokens += batch
        self.seconds += seconds
        self.roofline_s += roofline_s
        if batch >= self.BIG_BATCH:
            self.big_seconds += seconds
            self.big_roofline_s += roofline_s

    def summary(self) -> dict:
        return {"decode_steps": self.steps, "mean_decode_batch": self.tokens / max(self.steps, 1),
                "decode_step_ms": 1e3 * self.seconds / max(self.steps, 1),
                "roofline_step_ms": 1e3 * self.roofline_s / max(self.steps, 1),
                "roofline_fraction": self.roofline_s / self.seconds if self.seconds else None,
                f"roofline_fraction_batch{self.BIG_BATCH}":
                    self.big_roofline_s / self.big_seconds if self.big_seconds else None,
                "roofline_output_tokens_per_s": self.tokens / self.roofline_s if self.roofline_s else None}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)
