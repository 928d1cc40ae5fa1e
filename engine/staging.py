"""A step's metadata to the device in one transfer: its arrays packed into one pinned host buffer, one copy."""
from math import prod

import numpy as np
import torch


class Staging:
    """One int32 host buffer, pinned on CUDA, and its device twin. A step's arrays (token ids, positions, KV
    slots, block tables, LoRA tiles...) are written into named views of the host buffer and sent in one
    non-blocking copy. On CPU the host buffer is the device buffer: no copy at all.

    Device views alias the buffer: a step's inputs live until the next step's are written (on CUDA, stream
    order keeps queued kernels reading the old values; the host waits for the last copy to have left the
    host buffer before writing it again)."""

    def __init__(self, device: torch.device, numel: int = 0):
        self.on_cuda, self.device = device.type == "cuda", device
        self.copied = None   # a CUDA event: the last copy out of the host buffer
        self.host = self.dev = torch.empty(0, dtype=torch.int32)
        self._last_key, self._last_views = None, None
        self._reserve(numel)

    def _reserve(self, numel: int) -> None:
        if self.host.numel() >= numel:
            return
        self.wait()
        numel = max(numel, 2 * self.host.numel())
        self.host = torch.zeros(numel, dtype=torch.int32, pin_memory=self.on_cuda)
        self.dev = torch.zeros(numel, dtype=torch.int32, device=self.device) if self.on_cuda else self.host

    def wait(self) -> None:
        """Until the host buffer may be written again."""
        if self.copied is not None:
            self.copied.synchronize()

    def views(self, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        """Named host and device views laid back to back from the buffer's start (grown when too small;
        a caller that keeps device views across steps sizes the buffer up front so it never moves).
        Consecutive steps mostly have the same shapes: the last layout's views are reused then."""
        key = (tuple(shapes.items()), self.host.data_ptr())
        if key == self._last_key:
            return self._last_views
        sizes = {name: prod(shape) for name, shape in shapes.items()}
        self._reserve(sum(sizes.values()))
        host, hosts, devs, offset = self.host.numpy(), {}, {}, 0
        for name, shape in shapes.items():
            hosts[name] = host[offset:offset + sizes[name]].reshape(shape)
            devs[name] = self.dev[offset:offset + sizes[name]].view(shape)
            offset += sizes[name]
        self._last_key, self._last_views = (tuple(shapes.items()), self.host.data_ptr()), (hosts, devs)
        return hosts, devs

    def send(self, numel: int) -> None:
        """Copy the first numel elements to the device (nothing to do on CPU)."""
        if self.on_cuda:
            self.dev[:numel].copy_(self.host[:numel], non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def put(self, **arrays: np.ndarray) -> dict[str, torch.Tensor]:
        """Device views holding these arrays, sent in one copy."""
        self.wait()
        hosts, devs = self.views({name: array.shape for name, array in arrays.items()})
        for name, array in arrays.items():
            hosts[name][...] = array
        self.send(sum(array.size for array in arrays.values()))
        return devs
