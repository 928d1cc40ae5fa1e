"""A request's state while the engine works on it: tokens, KV block table, status, sampler."""
from enum import Enum, auto

import torch

from engine.request import Request


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request: Request, prompt_token_ids: list[int], max_new_tokens: int, seed: int):
        self.request = request
        # Copied out of the request: the scheduler reads them for every sequence on every step.
        self.request_id, self.adapter_id, self.sampling = request.request_id, request.adapter_id, request.sampling
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_new_tokens = max_new_tokens
        self.block_table: list[int] = []
        self.row: int | None = None          # its row in the scheduler's RunningBatch while it runs
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.output_text: str | None = None
        self.preemptions = 0
        # One generator per request: its samples do not depend on what it is batched with.
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens
