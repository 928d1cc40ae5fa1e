"""adapter_model.safetensors, read once: header checked against the base model and the config, then the tensor
bytes read straight into one host buffer (pinned on CUDA) while their sha256 is computed, then one pass that
finds NaN/Inf (or values the engine's dtype cannot hold) from the bits.

Nothing is transposed, cast or copied per module on the host: the bytes go to the device as they are stored
and the device lays them out (engine/adapter_memory.py). The file is read with readinto, not memory-mapped:
a mapped file truncated by another process while it is read kills the reader with SIGBUS, and readinto from
the page cache costs the same single copy that filling the pinned buffer from a mapping would.
"""
import hashlib
import json
import re
import struct
import threading
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from engine.adapter_config import LORA_MODULES, AdapterError, PatternMatcher, check_alpha, check_rank, \
    lora_scale, module_name
from engine.model import ModelArgs

KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d{1,6})\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                 r"\.weight")
HEADER_MAX_BYTES = 100 << 20     # safetensors' own limit
READ_CHUNK = 8 << 20
# safetensors dtype -> (torch dtype, unsigned view for the bit test, mask of everything but the sign)
FLOAT_DTYPES = {"F16": (torch.float16, np.uint16, 0x7FFF), "BF16": (torch.bfloat16, np.uint16, 0x7FFF),
                "F32": (torch.float32, np.uint32, 0x7FFFFFFF), "F64": (torch.float64, np.uint64, (1 << 63) - 1)}
SIGNED_VIEW = {np.uint16: torch.int16, np.uint32: torch.int32, np.uint64: torch.int64}


@dataclass(frozen=True)
class LoraTensor:
    name: str
    dtype: str                   # safetensors dtype, a key of FLOAT_DTYPES
    start: int                   # byte offsets in the data section (the file after its header)
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.dtype][0]


@dataclass(frozen=True)
class LoraModule:
    rank: int
    scale: float
    a: LoraTensor                # lora_A [rank, d_in], row-major as stored
    b: LoraTensor                # lora_B [d_out, rank]


@dataclass
class AdapterFile:
    adapter_id: str
    sha256: str                  # of the whole file
    data: torch.Tensor           # uint8: the file's tensor bytes as stored (pinned on CUDA)
    modules: dict[tuple[int, str], LoraModule]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def tensor(self, t: LoraTensor, shape: tuple[int, int]) -> torch.Tensor:
        return self.data[t.start:t.end].view(t.torch_dtype).view(shape)


def read_header(f, file_size: int) -> tuple[bytes, dict]:
    """The 8-byte length and the JSON header (raw, for the hash) and the header parsed."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError("file shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(HEADER_MAX_BYTES, file_size - 8):
        raise ValueError(f"header length {length:,} does not fit a file of {file_size:,} bytes")
    raw = f.read(length)
    if len(raw) < length:
        raise ValueError("file truncated inside its header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return prefix + raw, header


def _tensor(name: str, entry) -> tuple[LoraTensor, tuple]:
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or \
            not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2:
        raise ValueError(f"header entry {name!r} is malformed")
    dtype, shape, (start, end) = entry.get("dtype"), entry["shape"], entry["data_offsets"]
    if dtype not in FLOAT_DTYPES:
        raise AdapterError(f"tensor {name!r} is {dtype}: LoRA weights must be floating point (F16, BF16, F32 or "
                           f"F64); quantized or integer adapters are not supported, save it in floating point")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, start, end]):
        raise ValueError(f"header entry {name!r} has non-integer shape or offsets")
    itemsize = FLOAT_DTYPES[dtype][0].itemsize
    if len(shape) != 2 or end - start != shape[0] * shape[1] * itemsize or start % itemsize:
        raise ValueError(f"tensor {name!r}: shape {shape} and offsets {[start, end]} disagree or are misaligned")
    return LoraTensor(name, dtype, start, end), tuple(shape)


def check_header(header: dict, data_size: int, config: dict, args: ModelArgs, max_rank: int,
                 matcher: PatternMatcher) -> dict[tuple[int, str], LoraModule]:
    """Every tensor a LoRA A/B of a base module, floating point, of the base's shapes and the config's rank;
    offsets tiling the data section exactly (as safetensors requires). Reads no weights."""
    halves: dict[tuple[int, str], dict[str, tuple[LoraTensor, tuple]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        m = KEY.fullmatch(name)
        if not m or m.group(2) not in LORA_MODULES:
            raise AdapterError(f"unsupported tensor {name!r} (LoRA A/B on q,k,v,o,gate,up,down only)")
        halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = _tensor(name, entry)
    if not halves:
        raise AdapterError("adapter_model.safetensors holds no LoRA weights")
    spans = sorted((t.start, t.end) for pair in halves.values() for t, _ in pair.values())
    if [s for s, _ in spans] != [0] + [e for _, e in spans[:-1]] or spans[-1][1] != data_size:
        raise ValueError("tensor offsets do not tile the data section (overlapping, gapped or truncated file)")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    modules = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        if layer >= args.num_layers:
            raise AdapterError(f"layer {layer} does not exist in the base model ({args.num_layers} layers)")
        (a, a_shape), (b, b_shape) = pair["A"], pair["B"]
        d_in, d_out = args.lora_dims(module)
        r = a_shape[0]
        if a_shape != (r, d_in) or b_shape != (d_out, r):
            raise AdapterError(f"layer {layer} {module}: lora_A {a_shape} / lora_B {b_shape} do not fit the base "
                               f"model ({d_in} -> {d_out}); was it trained on another base?")
        check_rank(r, f"layer {layer} {module}: the weights' rank", max_rank)
        name = module_name(layer, module)
        rank_cfg = matcher.pattern_value(config.get("rank_pattern"), name, r_default, "rank_pattern")
        if rank_cfg != r:
            raise AdapterError(f"layer {layer} {module}: config says rank {rank_cfg}, weights have rank {r}")
        alpha = check_alpha(matcher.pattern_value(config.get("alpha_pattern"), name, alpha_default, "alpha_pattern"),
                            f"lora_alpha for {name}")
        modules[(layer, module)] = LoraModule(r, lora_scale(config, alpha, r), a, b)
    return modules


class HostBuffers:
    """Host buffers for adapter files. Page-locked ones (for a GPU) come from torch's caching host allocator,
    which reuses a block once the copies reading it are done. Pageable ones are reused here, as a fresh 300 MB
    buffer costs ~0.3 s of page faults: a buffer comes back when the tensor viewing it is freed, and at most
    keep_bytes of them wait for a reader."""

    def __init__(self, pin_memory: bool = False, keep_bytes: int = 0):
        self.pin_memory, self.keep_bytes = pin_memory, keep_bytes
        self._free: list[torch.Tensor] = []
        # Finalizers may run in any thread, inside `take` too: they only append here (atomic), take sorts it out.
        self._returned: deque[torch.Tensor] = deque()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        if self.pin_memory:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        with self._lock:
            while self._returned:
                self._free.append(self._returned.popleft())
            while sum(b.numel() for b in self._free) > self.keep_bytes:
                self._free.pop(0)
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 2 * nbytes]
            best = min(fits, key=lambda i: self._free[i].numel(), default=None)
            base = self._free.pop(best) if best is not None else torch.empty(nbytes, dtype=torch.uint8)
        view = base[:nbytes]
        weakref.finalize(view, self._returned.append, base)
        return view


def read_data(f, nbytes: int, hasher, buffers: HostBuffers) -> torch.Tensor:
    """The data section read into one buffer (page-locked when it will be copied to a GPU), hashed chunk by
    chunk as it arrives, while the chunk is still in cache."""
    data = buffers.take(nbytes)
    view = memoryview(data.numpy())
    pos = 0
    while pos < nbytes:
        got = f.readinto(view[pos:pos + READ_CHUNK])
        if not got:
            raise ValueError(f"file truncated while read ({pos:,} of {nbytes:,} tensor bytes)")
        hasher.update(view[pos:pos + got])   # hashlib releases the GIL: reader threads run in parallel
        pos += got
    return data


def _largest_magnitude(data: np.ndarray, dtype: str) -> torch.Tensor:
    """max |x| over a span of one dtype, computed on the bits (sign masked off) in cache-sized chunks: NaN and
    Inf have the largest bit patterns, so they come out as the result. A 0-d tensor of the span's dtype."""
    torch_dtype, unsigned, mask = FLOAT_DTYPES[dtype]
    values = data.view(unsigned)
    chunk = (1 << 20) // values.itemsize
    scratch, worst = np.empty(min(chunk, values.size), unsigned), 0
    for pos in range(0, values.size, chunk):
        part = scratch[:min(chunk, values.size - pos)]
        np.bitwise_and(values[pos:pos + chunk], unsigned(mask), out=part)
        worst = max(worst, int(part.max()))
    return torch.tensor(worst, dtype=SIGNED_VIEW[unsigned]).view(torch_dtype)


def check_values(file: AdapterFile, dtype: torch.dtype) -> None:
    """NaN or Inf anywhere, or a value `dtype` cannot hold, fails the adapter; one pass over its bytes."""
    data = file.data.numpy()
    tensors = sorted((t for m in file.modules.values() for t in (m.a, m.b)), key=lambda t: t.start)
    runs = []   # runs of tensors of one dtype, in file order
    for t in tensors:
        if runs and runs[-1][-1].dtype == t.dtype:
            runs[-1].append(t)
        else:
            runs.append([t])
    for run in runs:
        largest = _largest_magnitude(data[run[0].start:run[-1].end], run[0].dtype)
        if torch.isfinite(largest.to(dtype)):
            continue
        bad = next(t for t in run if not torch.isfinite(_largest_magnitude(data[t.start:t.end], t.dtype).to(dtype)))
        if not torch.isfinite(largest):
            raise AdapterError(f"tensor {bad.name!r} holds NaN or Inf: retrain or repair the adapter")
        raise AdapterError(f"tensor {bad.name!r} holds values up to {float(largest):.4g}, beyond {dtype} (the "
                           f"engine's dtype): run with --dtype bfloat16 or float32")


def read_adapter_file(f, file_size: int, adapter_id: str, config: dict, args: ModelArgs, dtype: torch.dtype,
                      max_rank: int, matcher: PatternMatcher, buffers: HostBuffers) -> AdapterFile:
    hasher = hashlib.sha256()
    head, header = read_header(f, file_size)
    hasher.update(head)
    data_size = file_size - len(head)
    modules = check_header(header, data_size, config, args, max_rank, matcher)
    data = read_data(f, data_size, hasher, buffers)
    if f.read(1):
        raise ValueError("file grew while it was read")
    file = AdapterFile(adapter_id, hasher.hexdigest(), data, modules)
    check_values(file, dtype)
    return file
