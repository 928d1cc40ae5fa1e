"""PEFT LoRA adapters: read and check `<root>/<adapter_id>/`, ahead of need, into bounded host memory.

An adapter that fails a check raises AdapterError once; the failure is remembered for the run so its other
rows fail fast with the same message. Checks run cheapest first: the name, the folder (no symlink out of the
root), the config (features, ranks against max_lora_rank, patterns under a time budget), the safetensors
header (dtypes, shapes, offsets), and only then the one read of the weights (sha256 and NaN/Inf on the way).
"""
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from engine.adapter_config import ADAPTER_ID, AdapterError, PatternMatcher, adapter_dir, check_config, \
    configured_ranks, read_adapter_config
from engine.adapter_file import AdapterFile, HostBuffers, read_adapter_file
from engine.model import ModelArgs

__all__ = ["ADAPTER_ID", "AdapterError", "AdapterStore", "read_adapter"]   # pipeline.requests: ADAPTER_ID
MAX_QUEUED_READS_PER_THREAD = 2   # so a reader finishing between two engine steps finds its next read queued


def read_adapter(root: str, adapter_id: str, args: ModelArgs, dtype: torch.dtype, max_rank: int,
                 storage_options: dict | None = None, base_model_name: str | None = None,
                 buffers: HostBuffers | None = None) -> AdapterFile:
    """Read `<root>/<adapter_id>/` from any fsspec URL; every failure becomes an AdapterError."""
    fs, base = adapter_dir(root, adapter_id, storage_options)
    config = read_adapter_config(fs, base, adapter_id)
    weights = f"{base}/adapter_model.safetensors"
    if not fs.exists(weights):
        pickled = fs.exists(f"{base}/adapter_model.bin")
        raise AdapterError(f"adapter {adapter_id!r} has no adapter_model.safetensors"
                           + (" (only a pickle adapter_model.bin, which is never unpickled: re-save it with"
                              " safe_serialization=True)" if pickled else ""))
    matcher = PatternMatcher()
    check_config(config, base_model_name, max_rank, matcher)
    configured_ranks(config, args, max_rank, matcher)   # the planner's view of the adapter must be valid too
    try:
        size = fs.size(weights)
        with fs.open(weights, "rb") as f:
            return read_adapter_file(f, size, adapter_id, config, args, dtype, max_rank, matcher,
                                     buffers or HostBuffers())
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt safetensors, storage errors
        raise AdapterError(f"adapter {adapter_id!r} cannot be read: {type(e).__name__}: {e}") from None


class AdapterStore:
    """Storage -> host memory (bounded in bytes) for the scheduler to load into the device pool.

    Reader threads read, check and pack (`pack` turns an AdapterFile into what the pool loads) the adapters
    `prefetch` names, in that order. Read-ahead (read or being read, not yet taken) is kept to half of
    host_cache_bytes: a read under way counts as big as the largest adapter read so far. Adapters already taken
    stay, least recently used first out, in the rest, for a reload after eviction from the pool."""

    def __init__(self, root: str | None, args: ModelArgs, dtype: torch.dtype, max_rank: int,
                 host_cache_bytes: int, pack: Callable[[AdapterFile], Any], storage_options: dict | None = None,
                 base_model_name: str | None = None, pin_memory: bool = False):
        self.root, self.args, self.dtype, self.max_rank = root, args, dtype, max_rank
        self.base_model_name = base_model_name
        self.buffers = HostBuffers(pin_memory, keep_bytes=host_cache_bytes // 4)
        self.capacity, self.pack, self.storage_options = host_cache_bytes, pack, storage_options
        self.readahead_bytes = host_cache_bytes // 2
        self._cache: OrderedDict[str, Any] = OrderedDict()   # taken at least once; LRU order
        self._ahead: dict[str, Future] = {}                   # read-ahead, in prefetch order
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._largest = 0
        # Reading, hashing and the NaN scan release the GIL, so threads scale with the host's cores.
        self.read_threads = max(2, min(8, os.cpu_count() or 2))
        self._reader = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="adapter-read")
        self.reads = 0
        self.bytes_read = 0
        self.read_s = 0.0        # wall seconds with at least one read under way
        self.wait_s = 0.0        # seconds `get` blocked its caller (the engine loop) on a read
        self._busy, self._busy_since = 0, 0.0

    def _read(self, adapter_id: str):
        if self.root is None:
            raise AdapterError(f"adapter {adapter_id!r} requested but no adapter root was given (--adapters)")
        with self._lock:
            if not self._busy:
                self._busy_since = time.perf_counter()
            self._busy += 1
        nbytes = 0
        try:
            packed = self.pack(read_adapter(self.root, adapter_id, self.args, self.dtype, self.max_rank,
                                            self.storage_options, self.base_model_name, self.buffers))
            nbytes = packed.nbytes
            return packed
        except AdapterError:
            raise
        except Exception as e:  # noqa: BLE001 - a config field of the wrong type, storage: fail its rows
            raise AdapterError(f"adapter {adapter_id!r} cannot be used: {type(e).__name__}: {e}") from None
        finally:
            with self._lock:
                self._busy -= 1
                if not self._busy:
                    self.read_s += time.perf_counter() - self._busy_since
                if nbytes:
                    self.reads += 1
                    self.bytes_read += nbytes
                    self._largest = max(self._largest, nbytes)

    def _ahead_bytes(self) -> int:
        return sum(f.result().nbytes if f.done() and not f.exception() else 0 if f.done() else self._largest
                   for f in self._ahead.values())

    def _evict(self) -> None:
        budget = self.capacity - self._ahead_bytes()
        while len(self._cache) > 1 and sum(p.nbytes for p in self._cache.values()) > budget:
            self._cache.popitem(last=False)

    def prefetch(self, adapter_ids: Iterable[str]) -> None:
        """Read ahead the adapters the queue will need next, in this order, as far as the read-ahead budget
        goes. Finished reads no longer named (the queue moved) join the LRU of taken adapters."""
        wanted = dict.fromkeys(adapter_ids)
        with self._lock:
            for adapter_id in [a for a, f in self._ahead.items() if a not in wanted and f.done()]:
                future = self._ahead.pop(adapter_id)
                if future.exception():
                    self._failed[adapter_id] = str(future.exception())
                else:
                    self._cache[adapter_id] = future.result()
            queued = sum(not f.done() for f in self._ahead.values())
            for adapter_id in wanted:
                if adapter_id in self._cache or adapter_id in self._failed or adapter_id in self._ahead:
                    continue
                if queued >= MAX_QUEUED_READS_PER_THREAD * self.read_threads or \
                        self._ahead_bytes() >= self.readahead_bytes:
                    break
                self._ahead[adapter_id] = self._reader.submit(self._read, adapter_id)
                queued += 1
            self._evict()

    def get(self, adapter_id: str):
        """The packed adapter (from memory, a read under way, or read now); AdapterError if unusable."""
        with self._lock:
            if adapter_id in self._failed:
                raise AdapterError(self._failed[adapter_id])
            if adapter_id in self._cache:
                self._cache.move_to_end(adapter_id)
                return self._cache[adapter_id]
            future = self._ahead.pop(adapter_id, None)
        started = time.perf_counter()
        try:
            if future is not None and future.cancel():   # still queued behind other reads: read it now
                future = None
            packed = future.result() if future else self._read(adapter_id)
        except AdapterError as e:
            self._failed[adapter_id] = str(e)
            raise
        finally:
            self.wait_s += time.perf_counter() - started
        with self._lock:
            self._cache[adapter_id] = packed
            self._evict()
        return packed

    def close(self) -> None:
        # Waits for reads under way: one still pinning memory could break the next engine's graph capture.
        self._reader.shutdown(wait=True, cancel_futures=True)
