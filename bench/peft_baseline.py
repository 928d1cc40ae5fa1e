"""The peers: Hugging Face transformers + PEFT on the same weights, adapters and requests.

PEFT is slow, so it runs a bounded slice: one batch of the workload's first requests, left-padded, for
a fixed number of decode steps. Its rate is the decode steps' rate (batch tokens over the time of the
steps after the first token), which leaves its prefill out: that favours PEFT, so a ratio against it
understates lorafleet's lead.
"""
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.roofline import DecodeRoofline, DecodeTiming, synchronize
from bench.workload import hf_state_dict
from engine.model import Transformer
from engine.request import Request


class StepClock(LogitsProcessor):
    """Notes the time each generated token's logits are ready (the first one ends the prefill)."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def build_hf_model(model_dir: Path, model: Transformer, dtype: torch.dtype, device: str):
    """transformers' LlamaForCausalLM holding a copy of lorafleet's random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    hf.load_state_dict(hf_state_dict(model))
    assert next(hf.parameters()).device.type == torch.device(device).type, "transformers built the model elsewhere"
    hf.generation_config.eos_token_id = None   # fixed output lengths, as in lorafleet's cases
    return hf.eval()


def load_peft(hf, adapter_root: Path, adapter_ids: list[str], dtype: torch.dtype, device: str):
    """All adapters of the slice loaded into one PeftModel, cast to the base dtype: PEFT keeps adapter
    weights in float32 by default, which would make its steps slower than they need be."""
    from peft import PeftModel
    first, *rest = adapter_ids
    peft = PeftModel.from_pretrained(hf, str(adapter_root / first), adapter_name=first, low_cpu_mem_usage=True)
    for adapter_id in rest:
        peft.load_adapter(str(adapter_root / adapter_id), adapter_name=adapter_id, low_cpu_mem_usage=True)
    return peft.to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def timed_generate(model, requests: list[Request], steps: int, device: str, timing: DecodeTiming,
                   roof: DecodeRoofline, **generate_kwargs) -> float:
    """One left-padded greedy batch of `steps` new tokens; adds its decode steps to `timing`; returns
    the wall time of the whole call."""
    width = max(len(r.prompt_token_ids) for r in requests)
    pad = [width - len(r.prompt_token_ids) for r in requests]
    ids = torch.tensor([[0] * p + r.prompt_token_ids for p, r in zip(pad, requests)], device=device)
    mask = torch.tensor([[0] * p + [1] * (width - p) for p in pad], device=device)
    clock = StepClock(device)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                         pad_token_id=0, logits_processor=LogitsProcessorList([clock]), **generate_kwargs)
    wall = time.perf_counter() - start
    assert out.shape[1] == width + steps, "PEFT stopped early: output lengths must be fixed"
    adapters = [r.adapter_id for r in requests]
    for i, (before, after) in enumerate(zip(clock.times, clock.times[1:])):
        # Step i reads the padded KV of width + i + 1 positions per row.
        timing.add(len(requests), after - before, roof.seconds(len(requests) * (width + i + 1), adapters))
    return wall


def peft_case(name: str, requests: list[Request], steps: int, timing: DecodeTiming, wall_s: float,
              adapters_per_step: int) -> dict:
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = len(requests) * steps
    n_adapters = len({r.adapter_id for r in requests})
    return dict(timing.summary(), case=name, n_adapters=n_adapters, requests=len(requests),
                requests_done=len(requests), new_tokens_per_request=steps, prompt_tokens=prompt_tokens,
                output_tokens=output_tokens, wall_s=wall_s, output_tokens_per_s=timing.tokens / timing.seconds,
                total_tokens_per_s=(prompt_tokens + output_tokens) / wall_s, adapter_loads=n_adapters,
                mean_adapters_per_decode_step=adapters_per_step)


def run_peft_mixed(peft, requests: list[Request], steps: int, device: str, roof: DecodeRoofline) -> dict:
    """What users do today: one batch of mixed adapters through `generate(adapter_names=...)`."""
    names = [r.adapter_id for r in requests]
    timed_generate(peft, requests[:1], 2, device, DecodeTiming(), roof, adapter_names=names[:1])   # warm-up
    timing = DecodeTiming()
    wall = timed_generate(peft, requests, steps, device, timing, roof, adapter_names=names)
    return peft_case("peft-mixed", requests, steps, timing, wall, len(set(names)))


def run_peft_single(peft, requests: list[Request], steps: int, device: str, roof: DecodeRoofline) -> dict:
    """The other habit: activate one adapter, run its requests, switch to the next."""
    timing, wall = DecodeTiming(), 0.0
    for adapter_id in dict.fromkeys(r.adapter_id for r in requests):
        peft.set_adapter(adapter_id)
        wall += timed_generate(peft, [r for r in requests if r.adapter_id == adapter_id], steps, device, timing,
                               roof)
    return peft_case("peft-single", requests, steps, timing, wall, 1)
