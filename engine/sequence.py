"""A request's state while the engine works on it: tokens, KV block table, status, sampling seed."""
from enum import Enum, auto

from engine.logprobs import TokenLogprobs
from engine.request import Request


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request: Request, prompt_token_ids: list[int], max_new_tokens: int, seed: int,
                 continuation_token_ids: list[int] = ()):
        self.request = request
        # Copied out of the request: the scheduler reads them for every sequence on every step.
        self.request_id, self.adapter_id, self.sampling = request.request_id, request.adapter_id, request.sampling
        self.token_ids = list(prompt_token_ids) + list(continuation_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # Scoring (engine/scoring.py): a scored sequence is one prefill over prompt + continuation.
        self.num_scored_tokens = len(continuation_token_ids)
        self.prefix_keys: list[bytes] = []      # keys of the prompt pages it may share (engine/prefix_cache.py)
        self.num_cached_tokens = 0              # leading tokens whose K/V shared pages already hold
        self.logprobs = TokenLogprobs()         # of its output tokens, when the request asks
        self.max_new_tokens = max_new_tokens
        self.block_table: list[int] = []
        self.row: int | None = None          # its row in the scheduler's RunningBatch while it runs
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.output_text: str | None = None
        self.preemptions = 0
        # With the position of each token, the seed alone decides what is sampled (engine/sampling.py);
        # any integer is taken modulo 2**64 and held as the int64 the sampler reads.
        self.seed = (seed + (1 << 63)) % (1 << 64) - (1 << 63)

    @property
    def is_scored(self) -> bool:
        return self.num_scored_tokens > 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens
