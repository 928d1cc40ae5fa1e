"""One config for the engine, validated once (nano-vllm style)."""
import re
from dataclasses import dataclass, field, fields

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str                                  # HF checkpoint dir, any fsspec URL
    adapters: str | None = None                 # adapter root: <adapters>/<adapter_id>/
    device: str = "cpu"                         # cpu | cuda | cuda:N
    dtype: str = "float32"                      # float32 | bfloat16 | float16
    max_active_adapters: int = 8                # distinct adapters in one batch
    max_num_seqs: int = 64                      # sequences in one batch
    max_num_batched_tokens: int = 4096          # prompt tokens in one prefill batch
    max_model_len: int | None = None            # default: the checkpoint's context length
    block_size: int = 16                        # tokens per KV block (one pool page)
    num_pages: int | None = None                # pool size; default from pool_memory_fraction / cpu_pool_bytes
    pool_memory_fraction: float = 0.85          # share of free GPU memory the pool takes (cuda)
    cpu_pool_bytes: int = 256 << 20             # pool size on cpu when num_pages is not given
    max_lora_rank: int = 64
    base_model_name: str | None = None          # refuse adapters whose base_model_name_or_path names another base
    max_resident_adapters: int = 64            # adapters kept in the pool at once (idle ones are evicted LRU)
    host_cache_bytes: int = 4 << 30             # host-memory LRU of adapter weights
    default_max_new_tokens: int = 128
    storage_options: dict = field(default_factory=dict)
    kernels: str = "auto"                       # auto (triton on cuda) | triton | torch
    cuda_graphs: bool = True                    # decode in CUDA graphs on cuda
    overlap_steps: bool | None = None           # read step N's tokens while step N+1 runs (default: on cuda)
    prefix_sharing: bool = True                 # scored rows of one adapter and prompt share its KV pages

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device cuda asked for, but torch sees no CUDA device")
        if self.device.startswith("cuda:") and int(self.device[5:]) >= torch.cuda.device_count():
            raise ValueError(f"device {self.device}: torch sees {torch.cuda.device_count()} CUDA devices")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, got {self.kernels!r}")
        for name in ("max_active_adapters", "max_num_seqs", "max_num_batched_tokens", "block_size",
                     "max_lora_rank", "max_resident_adapters", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_resident_adapters < self.max_active_adapters:
            raise ValueError("max_resident_adapters must be >= max_active_adapters")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def use_triton(self) -> bool:
        return self.kernels == "triton" or (self.kernels == "auto" and self.device.startswith("cuda"))

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from a larger dict (CLI args, Dagster config), keeping only our fields."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names and v is not None})
