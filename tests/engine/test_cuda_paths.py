"""The lines that run only on CUDA, reached on CPU with the CUDA calls faked (CI has no GPU).

A first run on a real GPU died at start on `torch.cuda.set_device(torch.device("cuda"))`; these tests
exist so that kind of line never again meets its first caller on a GPU.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs
from engine.engine import Engine
from engine.loader import load_model_args
from engine.model_runner import ModelRunner, pool_geometry, use_device
from engine.staging import Staging


class FakeCuda:
    """Records the torch.cuda calls a test makes; device `index` is current."""

    def __init__(self, monkeypatch, count: int = 2, index: int = 0):
        self.calls, self.index = [], index
        for name, fake in [("is_available", lambda: True), ("device_count", lambda: count),
                           ("current_device", lambda: self.index), ("set_device", self.set_device),
                           ("mem_get_info", lambda *a: (10 << 30, 80 << 30)), ("synchronize", lambda *a: None)]:
            monkeypatch.setattr(torch.cuda, name, fake)

    def set_device(self, device):
        assert isinstance(device, int), f"set_device wants an index here, got {device!r}"
        self.calls.append(("set_device", device))
        self.index = device


@pytest.mark.parametrize("device,index,expected", [("cuda", 1, 1), ("cuda:1", 0, 1), ("cuda:0", 1, 0)])
def test_use_device_accepts_a_plain_cuda_and_an_index(monkeypatch, device, index, expected):
    cuda = FakeCuda(monkeypatch, index=index)
    assert use_device(device) == torch.device("cuda", expected)
    assert cuda.calls == [("set_device", expected)]


def test_use_device_leaves_cuda_alone_on_cpu(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    assert use_device("cpu") == torch.device("cpu") and cuda.calls == []


def test_config_checks_cuda_devices(monkeypatch):
    FakeCuda(monkeypatch, count=2)
    assert EngineConfig(model="m", device="cuda").use_triton
    assert EngineConfig(model="m", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="torch sees 2 CUDA devices"):
        EngineConfig(model="m", device="cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        EngineConfig(model="m", device="cuda")


def test_the_pool_takes_its_share_of_free_gpu_memory(monkeypatch, llama_fleet):
    FakeCuda(monkeypatch)
    config = EngineConfig(model=str(llama_fleet.model), device="cuda", pool_memory_fraction=0.5)
    _, page_numel, num_pages = pool_geometry(config, load_model_args(config.model))
    assert num_pages == int((10 << 30) * 0.5) // (page_numel * 4)


def test_out_of_memory_hands_cached_blocks_back_on_cuda_only(monkeypatch, llama_fleet):
    engine = Engine(EngineConfig(model=str(llama_fleet.model), cpu_pool_bytes=1 << 20))
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    engine.runner.release_cached_memory()
    assert emptied == []
    engine.runner.device = torch.device("cuda", 0)
    engine.runner.release_cached_memory()
    assert emptied == [True]
    engine.close()


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: its pool is an id, its replay a marker."""
    made = []

    def __init__(self):
        FakeGraph.made.append(self)

    def pool(self):
        return ("pool", id(self))

    def replay(self):
        pass


def test_decode_graphs_capture_every_bucket_with_and_without_lora(monkeypatch, llama_fleet):
    """The capture lines themselves: thread-local capture mode, one shared memory pool (largest bucket
    first), the forward recorded inside the capture, after every bucket was warmed up outside it."""
    engine = Engine(EngineConfig(model=str(llama_fleet.model), adapters=str(llama_fleet.adapters),
                                 cpu_pool_bytes=16 << 20))
    runner = engine.runner
    FakeCuda(monkeypatch)
    FakeGraph.made = []
    captures, forwards = [], []

    class Capture:
        def __init__(self, graph, pool=None, capture_error_mode="global"):
            self.record = SimpleNamespace(graph=graph, pool=pool, mode=capture_error_mode)

        def __enter__(self):
            captures.append(self.record)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    real_forward = DecodeGraphs._forward
    monkeypatch.setattr(DecodeGraphs, "_forward",
                        lambda self, bs, with_lora: forwards.append((bs, with_lora, len(captures)))
                        or real_forward(self, bs, with_lora))
    graphs = DecodeGraphs(runner.model, runner.ops, runner.adapters, runner.pool, torch.zeros(4, dtype=torch.int32),
                          8, 2)
    steps = [(4, True), (4, False), (2, True), (2, False), (1, True), (1, False)]
    assert list(graphs.replays) == steps and all(c.mode == "thread_local" for c in captures)
    assert [c.pool for c in captures] == [None] + [("pool", id(g)) for g in FakeGraph.made[:-1]]
    assert [(bs, lora) for bs, lora, _ in forwards] == steps + steps      # warm-ups, then captures
    assert all(n == 0 for *_, n in forwards[:6]) and [n for *_, n in forwards[6:]] == [1, 2, 3, 4, 5, 6]
    engine.close()


class FakeEvent:
    """Stands in for torch.cuda.Event: counts records and waits."""
    recorded = waited = 0

    def record(self):
        FakeEvent.recorded += 1

    def synchronize(self):
        FakeEvent.waited += 1


def host_tensors_for_cuda(monkeypatch) -> None:
    """torch.zeros / torch.empty asked for pinned or device memory make plain CPU tensors; CUDA events are fakes."""
    def on_host(make):
        return lambda *args, pin_memory=False, device=None, **kwargs: make(*args, **kwargs)
    monkeypatch.setattr(torch, "zeros", on_host(torch.zeros))
    monkeypatch.setattr(torch, "empty", on_host(torch.empty))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.recorded = FakeEvent.waited = 0


def test_staging_on_cuda_sends_one_copy_and_waits_for_it_before_rewriting(monkeypatch):
    host_tensors_for_cuda(monkeypatch)
    staging = Staging(torch.device("cuda", 0))
    first = staging.put({"ids": np.arange(5), "temperature": np.full(3, 0.5, np.float32),
                         "seed": np.array([-1, 2**40], np.int64)}, {"temperature": np.float32, "seed": np.int64})
    assert staging.dev is not staging.host and FakeEvent.recorded == 1
    assert first["ids"].tolist() == [0, 1, 2, 3, 4] and first["ids"].dtype == torch.int32
    assert first["temperature"].tolist() == [0.5] * 3 and first["seed"].tolist() == [-1, 2**40]
    staging.put({"ids": np.arange(5)})
    assert FakeEvent.waited >= 1 and FakeEvent.recorded == 2       # the host buffer waited for the first copy


def test_step_tokens_reach_the_host_through_two_pinned_buffers_in_turn(monkeypatch):
    host_tensors_for_cuda(monkeypatch)
    runner = SimpleNamespace(device=torch.device("cuda", 0), _host_turn=0,
                             _host_tokens=[torch.full((8,), -9, dtype=torch.int64) for _ in range(2)])
    first = ModelRunner._send_to_host(runner, torch.tensor([4, 5, 6]))
    second = ModelRunner._send_to_host(runner, torch.tensor([7, 8]))
    assert first.host.data_ptr() != second.host.data_ptr()           # the next step does not overwrite the last
    assert first.read().tolist() == [4, 5, 6] and second.read().tolist() == [7, 8]
    assert FakeEvent.recorded == 2 and FakeEvent.waited == 2
