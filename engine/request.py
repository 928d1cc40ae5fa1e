"""What goes into the engine and what comes out: one request, one result."""
from dataclasses import dataclass, field


GREEDY_BELOW = 1e-5   # temperatures under this sample greedily
MAX_LOGPROBS = 20     # most top-N alternatives per token a request may ask for (OpenAI's bound)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = off
    seed: int | None = None           # None: derived from request_id, so reruns repeat
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        assert self.max_new_tokens >= 1, "max_new_tokens must be >= 1"
        assert self.temperature >= 0, "temperature must be >= 0"
        assert 0 < self.top_p <= 1, "top_p must be in (0, 1]"
        assert self.top_k >= 0, "top_k must be >= 0"

    @property
    def greedy(self) -> bool:
        # Below GREEDY_BELOW sampling is greedy in all but name, and logits / temperature overflow float32.
        return self.temperature < GREEDY_BELOW


@dataclass
class Request:
    request_id: str
    adapter_id: str | None                    # None = base model
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None  # used as-is when given
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Scored instead of generated when either is given (engine/scoring.py); the ids are used as-is.
    continuation: str | None = None
    continuation_token_ids: list[int] | None = None
    logprobs: int | None = None                # per-token log-probs with this many alternatives; None = none

    @property
    def is_scored(self) -> bool:
        return self.continuation is not None or self.continuation_token_ids is not None


@dataclass
class RequestOutput:
    request_id: str
    adapter_id: str | None
    output_text: str | None
    output_token_ids: list[int]
    prompt_tokens: int
    output_tokens: int
    finish_reason: str                 # "stop" | "length" | "scored" | "error"
    error: str | None = None
    adapter_sha256: str | None = None
    # scored rows: the continuation's summed log-prob, its tokens, whether each was the argmax
    continuation_logprob: float | None = None
    continuation_tokens: int | None = None
    is_greedy: bool | None = None
    # rows that asked for logprobs: one per output token, and its alternatives ({token_id, token, logprob})
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[dict]] | None = None

    @classmethod
    def failed(cls, request: Request, error: str, prompt_tokens: int = 0) -> "RequestOutput":
        return cls(request.request_id, request.adapter_id, None, [], prompt_tokens, 0, "error", error)
