"""The reference: transformers + PEFT generating mixed-adapter batches (adapter_names=) on CPU."""
import torch

from engine.request import Request

EOS = 2


def load_oracle(model_dir, adapter_root, adapter_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    first, *rest = adapter_ids
    model = PeftModel.from_pretrained(base, adapter_root / first, adapter_name=first)
    for adapter_id in rest:
        model.load_adapter(adapter_root / adapter_id, adapter_name=adapter_id)
    return model.eval()


def oracle_generate(model, requests: list[Request], max_new_tokens: int) -> list[list[int]]:
    """One left-padded mixed-adapter batch through PEFT, greedy; tokens cut after the first EOS."""
    width = max(len(r.prompt_token_ids) for r in requests)
    pad = [width - len(r.prompt_token_ids) for r in requests]
    ids = torch.tensor([[0] * p + r.prompt_token_ids for p, r in zip(pad, requests)])
    mask = torch.tensor([[0] * p + [1] * len(r.prompt_token_ids) for p, r in zip(pad, requests)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             adapter_names=[r.adapter_id or "__base__" for r in requests], eos_token_id=EOS,
                             pad_token_id=0)
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in out[:, width:].tolist()]


def mixed_requests(adapter_ids: list[str], n: int, max_new_tokens: int, seed: int = 0) -> list[Request]:
    """Prompts of varied lengths (2-19 tokens); adapters round-robin with base-model rows mixed in."""
    from engine.request import SamplingParams
    g = torch.Generator().manual_seed(seed)
    choices = [None] + adapter_ids
    return [Request(f"r{i}", choices[i % len(choices)],
                    prompt_token_ids=torch.randint(4, 124, (int(torch.randint(2, 20, (1,), generator=g)),),
                                                   generator=g).tolist(),
                    sampling=SamplingParams(max_new_tokens=max_new_tokens))
            for i in range(n)]


# One adapter resident, one sequence at a time: with requests in mixed_requests' round-robin order, every
# adapter row after another adapter's reloads its adapter (the scheduler finds no same-adapter work ahead).
RELOAD_EVERY_SWITCH = dict(max_active_adapters=1, max_resident_adapters=1, max_num_seqs=1)


def generated_tokens(engine, requests: list[Request]) -> dict[str, list[int]]:
    """Output tokens by request_id; closes the engine (its stats stay readable)."""
    try:
        return {o.request_id: o.output_token_ids for o in engine.generate(requests)}
    finally:
        engine.close()
