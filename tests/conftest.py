"""Session-wide tiny fleets: a random checkpoint per architecture and PEFT adapters of mixed ranks."""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU only in the interpreter, which must be on before anything imports triton
    # (peft and transformers do).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# dagster_project's partitions start at the data's first night, found when it is imported: pin them, so the tests'
# nights are partitions whatever demo_data/ the repo holds (a test that wants the data's start unsets this).
os.environ.setdefault("LORAFLEET_START_DATE", "2024-01-01")

from tests.checkpoints import build_adapter, build_checkpoint

# adapter id -> build_adapter kwargs: ranks 1 to 64, partial target sets, regex and all-linear targets, rsLoRA
ADAPTERS = {
    "r1-q": dict(rank=1, alpha=2, targets=["q_proj"], seed=11),
    "r8-qv": dict(rank=8, alpha=16, targets=["q_proj", "v_proj"], seed=12),
    "r16-all-rs": dict(rank=16, alpha=8, targets="all-linear", use_rslora=True, seed=13, init_std=0.1),
    "r64-mlp-o": dict(rank=64, alpha=32, targets=["o_proj", "gate_proj", "up_proj", "down_proj"], seed=14,
                      init_std=0.06),
    "r4-regex-kv": dict(rank=4, alpha=4, targets=r".*\.(k_proj|v_proj)", seed=15),
}
ARCHS = {
    # Llama: untied embeddings, llama3 rope scaling. Qwen2: tied embeddings, q/k/v biases.
    "llama": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(tie=True),
}


@dataclass
class Fleet:
    arch: str
    model: Path
    adapters: Path

    @property
    def adapter_ids(self) -> list[str]:
        return list(ADAPTERS)


def build_fleet(root: Path, arch: str) -> Fleet:
    model = build_checkpoint(root / "model", arch, **ARCHS[arch])
    for adapter_id, kwargs in ADAPTERS.items():
        build_adapter(root / "adapters" / adapter_id, model, **kwargs)
    return Fleet(arch, model, root / "adapters")


@pytest.fixture(scope="session", params=list(ARCHS))
def fleet(request, tmp_path_factory) -> Fleet:
    """One tiny checkpoint + five adapters per architecture (built once per session)."""
    return build_fleet(tmp_path_factory.mktemp(f"fleet-{request.param}"), request.param)


@pytest.fixture(scope="session")
def llama_fleet(tmp_path_factory) -> Fleet:
    return build_fleet(tmp_path_factory.mktemp("fleet-llama-only"), "llama")


@dataclass
class DemoNights:
    result: object            # pipeline.demo.nights.DemoResult
    printed: str              # what the demo printed
    dagster_home: Path        # the instance its nights were materialized into


@pytest.fixture(scope="session")
def demo_nights(tmp_path_factory) -> DemoNights:
    """The small demo (a minute or two: it trains a tiny model and five adapters) on the three nights before
    today, each night materialized by Dagster into an instance of its own, as `make demo` does."""
    from rich.console import Console

    from dagster_project.demo import dagster_nights
    from pipeline.demo.nights import run_demo
    root = tmp_path_factory.mktemp("demo")
    console = Console(record=True, width=160)
    result = run_demo(str(root / "data"), "small", console=console,
                      run_night=dagster_nights(str(root / "data"), root / "dagster_home"))
    return DemoNights(result, console.export_text(), root / "dagster_home")

