"""Where a step's time goes: a torch.profiler trace summed into attention / matmuls / LoRA / elementwise / other.

On CUDA each kernel's own device time is counted; on CPU (the torch references) each op's own CPU time,
grouped by the same names (there the LoRA references' matmuls count as matmuls).
"""
import torch
from torch.profiler import ProfilerActivity, profile

GROUPS = ("attention", "matmuls", "LoRA", "elementwise", "other")
# first match wins: LoRA and attention kernels before the generic matmul and elementwise names
KEYWORDS = (
    ("LoRA", ("shrink", "_expand", "lora", "sgmv", "bgmv")),
    ("attention", ("paged_decode", "reduce_splits", "prefill", "attention", "flash", "fmha",
                   "aten::_softmax", "aten::_safe_softmax")),             # the CPU reference attention's softmax
    ("matmuls", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm",
                 "aten::matmul", "aten::linear")),
    ("elementwise", ("rms_norm", "rope", "silu", "elementwise", "index", "cat", "copy", "fill", "aten::add",
                     "aten::mul", "aten::sub", "aten::neg", "aten::pow", "aten::mean", "aten::rsqrt", "aten::to",
                     "aten::embedding", "aten::cos", "aten::sin", "aten::where", "aten::isneginf", "reduce_kernel")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, words in KEYWORDS if any(w.lower() in lowered for w in words)), "other")


def profile_steps(step, n_steps: int, device: str) -> dict[str, float]:
    """Run step() n_steps times under the profiler; ms per step in each group, and their total."""
    on_cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
        if on_cuda:
            torch.cuda.synchronize()
    ms = dict.fromkeys(GROUPS, 0.0)
    for event in prof.key_averages():
        own_us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if own_us > 0:
            ms[group_of(event.key)] += own_us / 1e3 / n_steps
    ms["total"] = sum(ms[g] for g in GROUPS)
    return ms
