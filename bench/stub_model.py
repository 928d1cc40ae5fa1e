"""A stand-in for the model that costs (almost) nothing, so a step measures the engine's own work.

It is a real `Transformer` (one tiny layer: the runner sizes its page pool and CUDA graphs from it as usual)
whose forward returns zeros and whose logits are one fixed random table. Scheduling, input building, graph
buffer copies, sampling and bookkeeping all run as in a real step; the model behind them is gone. It plugs
in where benchmarks pass a prebuilt model (`Engine(config, model)`), so it needs no hook in the engine.
"""
import torch

from engine.model import ModelArgs, Transformer

STUB_CONFIG = dict(model_type="llama", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                   num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=10000.0,
                   hidden_act="silu", tie_word_embeddings=False)


class StubModel(Transformer):
    def __init__(self, vocab_size: int, max_positions: int, max_batch: int, device: str, seed: int = 0):
        super().__init__(ModelArgs.from_hf_config(dict(STUB_CONFIG, vocab_size=vocab_size,
                                                       max_position_embeddings=max_positions)))
        self.to(device)
        gen = torch.Generator(device).manual_seed(seed)
        self.logits = torch.randn(max_batch, vocab_size, generator=gen, device=device) * 3

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], self.args.hidden_size, device=input_ids.device)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits[:hidden.shape[0]]
