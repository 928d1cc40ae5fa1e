"""What an engine did: tokens, steps, adapter loads and reads, pool use (the run summary copies them)."""
from dataclasses import asdict, dataclass


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    decode_steps: int = 0
    adapters_per_decode_step: int = 0   # summed; divide by decode_steps for the mean
    adapter_loads: int = 0
    adapter_bytes_loaded: int = 0
    adapter_reads: int = 0
    adapter_bytes_read: int = 0
    adapter_read_s: float = 0.0         # wall seconds with at least one adapter read under way
    adapter_load_wait_s: float = 0.0    # seconds the engine loop (so the device) waited for an adapter read
    peak_pool_pages_used: int = 0
    pool_pages: int = 0
    preemptions: int = 0
    prefill_tokens_requested: int = 0   # tokens of every prefilled sequence (prompt, continuation, recompute)
    prefill_tokens_computed: int = 0    # of those, the ones run through the model (not in shared prefix pages)
    scored_tokens: int = 0              # continuation tokens scored

    @property
    def mean_adapters_per_decode_step(self) -> float:
        return self.adapters_per_decode_step / max(self.decode_steps, 1)

    @property
    def adapter_read_gb_per_s(self) -> float:
        return self.adapter_bytes_read / self.adapter_read_s / 1e9 if self.adapter_read_s else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:   # the engine's end-of-run log line: figures a person reads, not a repr
        return (f"{self.prompt_tokens:,} prompt + {self.output_tokens:,} output tokens in {self.steps:,} steps "
                f"({self.decode_steps:,} decode, {self.mean_adapters_per_decode_step:.1f} adapters each); "
                f"{self.adapter_loads:,} adapter loads ({self.adapter_bytes_loaded / 2**20:,.1f} MiB, "
                f"{self.adapter_reads:,} reads); pool peak {self.peak_pool_pages_used:,} of {self.pool_pages:,} "
                f"pages; {self.preemptions:,} preemptions")
