"""Decode steps through DecodeGraphs' static buffers give the eager path's tokens.

Here a "replay" runs the recorded step eagerly on the same static buffers, on the Triton kernels (the
interpreter on CPU), under a guard that fails on anything a CUDA graph capture rejects: a host read of
a device value or an op whose output shape depends on data. That checks the bucket padding, the scratch
page, the block-table and adapter-slot inputs, and the graph-safety of the step, without a GPU.
On a GPU host the replays run eagerly on CUDA; real captures: tests/engine/test_gpu.py.
"""
import threading
from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.engine import Engine
from tests.oracle import mixed_requests

aten = torch.ops.aten
# Ops the host must wait for: their result is read on the host, or sizes the output.
HOST_SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten._unique2.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


class NoHostSync(TorchDispatchMode):
    """Fails on a host sync in this thread. Tensor.tolist of a CPU tensor is not dispatched (on CUDA it
    would be a copy to the host), so it is caught by name; the adapter reader threads may use it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1])
        if func in HOST_SYNCS or masked:
            raise AssertionError(f"{func} in a captured decode step: a CUDA graph cannot record it")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        owner, self.tolist = threading.get_ident(), torch.Tensor.tolist

        def tolist(tensor):
            if threading.get_ident() == owner:
                raise AssertionError("Tensor.tolist in a captured decode step: a CUDA graph cannot record it")
            return self.tolist(tensor)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self.tolist
        return super().__exit__(*exc)


class EagerReplayGraphs(DecodeGraphs):
    """DecodeGraphs whose 'capture' records the step as a function that replays it eagerly."""

    def _capture(self, bs, with_lora, memory_pool):
        self.replayed = Counter()

        def replay():
            self.replayed[bs, with_lora] += 1
            with NoHostSync():
                self.hidden[:bs] = self._forward(bs, with_lora)
        return replay, None


def test_the_guard_catches_host_syncs():
    with pytest.raises(AssertionError, match="_local_scalar_dense"), NoHostSync():
        int(torch.ones(1).sum())
    with pytest.raises(AssertionError, match="tolist"), NoHostSync():
        torch.arange(3).tolist()
    with pytest.raises(AssertionError, match="index"), NoHostSync():
        torch.arange(3)[torch.arange(3) > 0]
    assert torch.arange(3).tolist() == [0, 1, 2]   # restored on exit


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_graph_decode_steps_give_the_eager_tokens(llama_fleet, overlap):
    mixed = mixed_requests(llama_fleet.adapter_ids, 11, 6, seed=3)
    base_only = [replace(r, request_id=f"base-{r.request_id}", adapter_id=None)
                 for r in mixed_requests(llama_fleet.adapter_ids, 3, 6, seed=4)]
    # On a GPU host the same eager replays run on CUDA (the interpreter is only on without one).
    config = dict(model=str(llama_fleet.model), adapters=str(llama_fleet.adapters), kernels="triton",
                  device="cuda" if torch.cuda.is_available() else "cpu", cuda_graphs=False, num_pages=256,
                  max_num_seqs=6, max_active_adapters=3, overlap_steps=overlap)

    def run(engine):
        outputs = {o.request_id: o.output_token_ids for batch in (mixed, base_only) for o in engine.generate(batch)}
        engine.close()
        return outputs

    expected = run(Engine(EngineConfig(**config)))
    engine = Engine(EngineConfig(**config))
    runner = engine.runner
    graphs = EagerReplayGraphs(runner.model, runner.ops, runner.adapters, runner.pool, runner.row_tokens,
                               runner.pool.blocks_needed(runner.max_model_len), 3)
    runner.graphs = graphs
    assert graphs.buckets == [1, 2, 4, 6]
    assert run(engine) == expected
    assert sum(graphs.replayed.values()) == engine.stats.decode_steps
    sizes = {bs for bs, _ in +graphs.replayed}
    assert 6 in sizes and sizes & {2, 4}                              # padded buckets ran too
    assert {with_lora for _, with_lora in +graphs.replayed} == {True, False}   # base-only batches skip LoRA
