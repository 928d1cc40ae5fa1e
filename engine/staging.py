"""A step's metadata to the device in one transfer: its arrays packed into one pinned host buffer, one copy."""
from math import prod

import numpy as np
import torch

# element types a buffer of 4-byte words carries: each array is written as its bytes and viewed back as its type
TORCH_TYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}


class Staging:
    """One host buffer of 4-byte words, pinned on CUDA, and its device twin. A step's arrays (token ids,
    positions, KV slots, block tables, LoRA tiles, sampling parameters...) are written into named views of
    the host buffer and sent in one non-blocking copy. On CPU the host buffer is the device buffer: no copy.

    Device views alias the buffer: a step's inputs live until the next step's are written (on CUDA, stream
    order keeps queued kernels reading the old values; the host waits for the last copy to have left the
    host buffer before writing it again)."""

    def __init__(self, device: torch.device, words: int = 0):
        self.on_cuda, self.device = device.type == "cuda", device
        self.copied = None   # a CUDA event: the last copy out of the host buffer
        self.host = self.dev = torch.empty(0, dtype=torch.int32)
        self._last_key, self._last_views = None, None
        self._reserve(words)

    def _reserve(self, words: int) -> None:
        if self.host.numel() >= words:
            return
        self.wait()
        words = max(words, 2 * self.host.numel())
        self.host = torch.zeros(words, dtype=torch.int32, pin_memory=self.on_cuda)
        self.dev = torch.zeros(words, dtype=torch.int32, device=self.device) if self.on_cuda else self.host

    def wait(self) -> None:
        """Until the host buffer may be written again."""
        if self.copied is not None:
            self.copied.synchronize()

    def views(self, specs: dict[str, tuple[tuple[int, ...], np.dtype]]
              ) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """Named host and device views, each {name: (shape, dtype)} (int32, float32 or int64), laid back to
        back from the buffer's start (8-byte types 8-byte aligned), the buffer grown when too small: a caller
        that keeps device views across steps sizes it up front so it never moves. Consecutive steps mostly
        have the same specs: the last layout's views are reused then."""
        key = (tuple(specs.items()), self.host.data_ptr())
        if key == self._last_key:
            return self._last_views[:2]
        layout, offset = {}, 0
        for name, (shape, dtype) in specs.items():
            width = np.dtype(dtype).itemsize // 4
            offset += offset % width
            layout[name] = (offset, prod(shape) * width, shape, np.dtype(dtype))
            offset += prod(shape) * width
        self._reserve(offset)
        host, hosts, devs = self.host.numpy(), {}, {}
        for name, (start, words, shape, dtype) in layout.items():
            hosts[name] = host[start:start + words].view(dtype).reshape(shape)
            devs[name] = self.dev[start:start + words].view(TORCH_TYPES[dtype]).view(shape)
        self._last_key, self._last_views = (tuple(specs.items()), self.host.data_ptr()), (hosts, devs, offset)
        return hosts, devs

    @property
    def words(self) -> int:
        """Words the last layout (views) spans."""
        return self._last_views[2]

    def send(self, words: int | None = None) -> None:
        """Copy the first `words` words (the last layout's by default) to the device (nothing to do on CPU)."""
        if self.on_cuda:
            words = self.words if words is None else words
            self.dev[:words].copy_(self.host[:words], non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def put(self, arrays: dict[str, np.ndarray], dtypes: dict[str, type] | None = None) -> dict[str, torch.Tensor]:
        """Device views holding these arrays, sent in one copy: as int32 (what the model and kernels take),
        or as the type `dtypes` names for them (float32 or int64)."""
        self.wait()
        dtypes = dtypes or {}
        specs = {name: (a.shape, np.dtype(dtypes.get(name, np.int32))) for name, a in arrays.items()}
        hosts, devs = self.views(specs)
        for name, array in arrays.items():
            hosts[name][...] = array
        self.send()
        return devs
