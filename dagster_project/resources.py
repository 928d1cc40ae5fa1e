"""Where a deployment's data and weights live and how its engine runs: one resource, set by env vars."""
import os
from pathlib import Path

import torch
from dagster import ConfigurableResource
from pydantic import Field

from engine.config import EngineConfig
from pipeline.plan import AdapterShard
from pipeline.storage import filesystem, join, visible_files

DEMO_ROOT = str(Path(__file__).resolve().parents[1] / "demo_data")  # `python -m pipeline.demo --root demo_data`
CUDA = torch.cuda.is_available()


class LorafleetResource(ConfigurableResource):
    """Each field defaults to the env var LORAFLEET_<FIELD> (see from_env); with none set, the demo's data."""

    root: str = DEMO_ROOT                      # <root>/requests, results, metrics (any fsspec URL)
    model: str | None = None                   # base checkpoint; default <root>/model
    adapters: str | None = None                # adapter root; default <root>/adapters
    device: str = "cuda" if CUDA else "cpu"
    dtype: str = "bfloat16" if CUDA else "float32"
    max_active_adapters: int = 8
    max_num_seqs: int = 64
    default_max_new_tokens: int = 128
    prefix_sharing: bool = True                # scored rows of one adapter and prompt share its KV pages
    base_model_name: str | None = None         # adapters trained on another base fail their rows
    max_error_rate: float = 0.05               # bound of the error-rate check
    regression_margin: float = 0.05            # a score that drops by more than this is a regression
    storage_options: dict[str, str] = Field(default_factory=dict)  # fsspec options (config only, not env)

    @classmethod
    def from_env(cls, environ=os.environ) -> "LorafleetResource":
        settable = [name for name in cls.model_fields if name != "storage_options"]
        return cls(**{name: environ[f"LORAFLEET_{name.upper()}"] for name in settable
                      if f"LORAFLEET_{name.upper()}" in environ})

    @property
    def model_url(self) -> str:
        return self.model or join(self.root, "model")

    @property
    def adapters_url(self) -> str:
        return self.adapters or join(self.root, "adapters")

    def engine_config(self, adapter_shard: AdapterShard = AdapterShard()) -> EngineConfig:
        """The engine of a night, or of one adapter shard of it: shard i takes GPU i (of those it sees)."""
        device = self.device
        if device == "cuda" and adapter_shard.count > 1:
            device = f"cuda:{adapter_shard.index % torch.cuda.device_count()}"
        return EngineConfig.from_kwargs(**{**self.model_dump(), "model": self.model_url,
                                           "adapters": self.adapters_url, "device": device})

    def request_days(self) -> dict[str, list[str]]:
        """The request files (Parquet, OpenAI batch .jsonl) under <root>/requests, by day (date=YYYY-MM-DD)."""
        fs, folder = filesystem(join(self.root, "requests"), self.storage_options)
        if not fs.isdir(folder):
            return {}
        days: dict[str, list[str]] = {}
        for path in visible_files(fs, folder):
            day = path[len(folder):].lstrip("/").split("/")[0]
            if day.startswith("date=") and path.endswith((".parquet", ".jsonl")):
                days.setdefault(day.removeprefix("date="), []).append(path)
        return days


def adapter_shards_from_env(environ=os.environ) -> list[AdapterShard]:
    """LORAFLEET_ADAPTER_SHARDS: parts a night is split into, by adapter, each its own step on its own GPU
    (default 1). It shapes the graph of `generations`, so it is read when the code loads, not per run."""
    text = environ.get("LORAFLEET_ADAPTER_SHARDS", "1")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"LORAFLEET_ADAPTER_SHARDS must be a whole number >= 1, got {text!r}")
    return [AdapterShard(i, int(text)) for i in range(int(text))]
