"""The step benchmark runs on CPU (--tiny: every code path of the GPU run on a tiny model; --stub: host work
only) and reports every case, profile group, host figure and sampler size. No timing is asserted."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from bench.kernel_groups import GROUPS, group_of, profile_steps

ROOT = Path(__file__).resolve().parents[2]
CASES = ["base @4", "base @16", "N1 @4", "N1 @16", "N16 @4", "N16 @16", "base sampled @16"]
HOST = ["greedy", "greedy, 16 adapters", "sampled"]


def run_bench(mode: str, out: Path) -> tuple[dict, str]:
    run = subprocess.run([sys.executable, "-m", "bench.bench_step", mode, "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "bench_step.json").read_text()), run.stdout


@pytest.mark.slow      # 10-30 s on the 2-core CPU: a tiny model through 7 cases, 2 profiles and the stubs
def test_tiny_run_reports_every_case_profile_and_host_figure(tmp_path):
    data, stdout = run_bench("--tiny", tmp_path)
    assert [c["case"] for c in data["cases"]] == CASES
    for c in data["cases"]:
        for key in ("step_ms", "roofline_ms", "x_roofline", "host_ms"):
            assert c[key] > 0 and math.isfinite(c[key]), (c["case"], key)
        assert f"{c['case']} " in stdout
    assert data["cases"][-1]["sampled"] and data["cases"][-1]["x_greedy"] > 0
    assert list(data["profiles"]) == ["base @16", "N16 @16"]
    for groups in data["profiles"].values():
        assert set(groups) == set(GROUPS) | {"total"} and groups["total"] > 0
        assert groups["matmuls"] > 0 and groups["attention"] > 0
    assert list(data["host"]) == HOST and all(ms > 0 for ms in data["host"].values())
    assert list(data["sampler"]) == ["512", "32000"]
    assert data["meta"]["mode"] == "tiny" and data["meta"]["bandwidth_bytes_per_s"] > 0


def test_stub_run_reports_host_work_and_the_sampler_only(tmp_path):
    data, stdout = run_bench("--stub", tmp_path)
    assert data["cases"] == [] and data["profiles"] == {}
    assert list(data["host"]) == HOST and list(data["sampler"]) == ["512", "32000"]
    assert "host work per decode step" in stdout and "vocabulary  32000" in stdout


@pytest.mark.parametrize("name, group", [
    ("_paged_decode_kernel", "attention"), ("_reduce_splits_kernel", "attention"), ("_prefill_kernel", "attention"),
    ("_shrink_kernel", "LoRA"), ("_expand_kernel", "LoRA"), ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "matmuls"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmuls"), ("aten::addmm", "matmuls"),
    ("_rms_norm_kernel", "elementwise"), ("_rope_kv_kernel", "elementwise"), ("_silu_and_mul_kernel", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "elementwise"), ("aten::expand", "other"),
    ("void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<float>", "other"),
])
def test_kernel_names_fall_in_their_group(name, group):
    assert group_of(name) == group


def test_profile_steps_count_each_group_per_step(monkeypatch):
    x = torch.randn(64, 64)
    ms = profile_steps(lambda: (x @ x).add_(1), 3, "cpu")
    assert set(ms) == set(GROUPS) | {"total"} and ms["matmuls"] > 0 and ms["elementwise"] > 0
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)     # the CUDA path, on a host without CUDA
    cuda = profile_steps(lambda: x @ x, 1, "cuda" if torch.cuda.is_available() else "cuda:fake")
    assert set(cuda) == set(GROUPS) | {"total"}
