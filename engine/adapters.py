"""PEFT LoRA adapters: read and validate `<root>/<adapter_id>/`, and keep them in a host-memory LRU.

An adapter that fails validation raises AdapterError once; the failure is remembered for the run so
its other rows fail fast with the same message.
"""
import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes

from engine.model import LORA_GROUPS, ModelArgs

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LORA_MODULES = tuple(m for members in LORA_GROUPS.values() for m in members)
KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


class AdapterError(Exception):
    """An adapter that cannot be used; the message says why and what to do."""


@dataclass
class AdapterWeights:
    adapter_id: str
    sha256: str
    nbytes: int
    # (layer, module) -> (A^T rows [r, d_in], B rows [r, d_out], scale); module in LORA_MODULES
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]


def module_name(layer: int, module: str) -> str:
    """The module's name in a transformers Llama-family model, which PEFT's patterns match against."""
    block = "mlp" if module in LORA_GROUPS["gate_up"] + LORA_GROUPS["down"] else "self_attn"
    return f"model.layers.{layer}.{block}.{module}"


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def configured_ranks(config: dict, args: ModelArgs) -> dict[tuple[int, str], int]:
    """Rank of each (layer, module) an adapter_config.json targets, rank_pattern applied: what the
    adapter will hold, known before its weights are read (the planner sizes adapters with it)."""
    targets = config.get("target_modules") or []

    def targeted(module: str, name: str) -> bool:
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith(f".{t}") for t in targets)

    return {(layer, module): int(_pattern_value(config.get("rank_pattern"), module_name(layer, module),
                                                config.get("r", 8)))
            for layer in range(args.num_layers) for module in LORA_MODULES
            if targeted(module, module_name(layer, module))}


def same_base(adapter_base: str, base_model_name: str) -> bool:
    """Whether an adapter's base_model_name_or_path names this base: hub ids and paths are compared by their
    last component ("meta-llama/Llama-2-7b-hf" is "/models/llama-2-7b-hf"), as the training machine's
    path is rarely the serving one's."""
    def name(text: str) -> str:
        return text.rstrip("/").rsplit("/", 1)[-1].lower()
    return name(adapter_base) == name(base_model_name)


def _check_config(config: dict, base_model_name: str | None) -> None:
    given = config.get("base_model_name_or_path")
    if base_model_name and given and not same_base(given, base_model_name):
        raise AdapterError(f"trained on {given!r} (base_model_name_or_path), but the base model is "
                           f"{base_model_name!r} (--base-model-name)")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {config.get('peft_type')!r} is not supported (LoRA only)")
    unsupported = [("use_dora", "DoRA"), ("layers_to_transform", "layers_to_transform"),
                   ("modules_to_save", "modules_to_save"), ("trainable_token_indices", "trainable tokens"),
                   ("lora_bias", "lora_bias"), ("target_parameters", "target_parameters")]
    for key, what in unsupported:
        if config.get(key):
            raise AdapterError(f"{what} is not supported; retrain or merge the adapter without it")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"bias={config['bias']!r} is not supported (only bias='none')")
    if config.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out adapters are not supported for Llama-family models")
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for name in ("embed_tokens", "lm_head"):
        hit = (re.fullmatch(targets, name) or re.fullmatch(targets, f"model.{name}")) \
            if isinstance(targets, str) and targets != "all-linear" else name in names
        if hit:
            raise AdapterError(f"LoRA on {name} is not supported (targets may be q,k,v,o,gate,up,down)")


def parse_adapter(adapter_id: str, config: dict, tensors: dict[str, torch.Tensor], args: ModelArgs,
                  dtype: torch.dtype, sha256: str, nbytes: int, max_rank: int,
                  base_model_name: str | None = None) -> AdapterWeights:
    """Validate a PEFT adapter against the base model and turn it into per-module row tensors."""
    _check_config(config, base_model_name)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = KEY.fullmatch(key)
        if not m or m.group(2) not in LORA_MODULES:
            raise AdapterError(f"unsupported tensor {key!r} (LoRA A/B on q,k,v,o,gate,up,down only)")
        halves.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    if not halves:
        raise AdapterError("adapter_model.safetensors holds no LoRA weights")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    modules = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"layer {layer} {module}: lora_A and lora_B must both be present")
        if layer >= args.num_layers:
            raise AdapterError(f"layer {layer} does not exist in the base model ({args.num_layers} layers)")
        a, b = pair["A"], pair["B"]
        d_in, d_out = args.lora_dims(module)
        r = a.shape[0]
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise AdapterError(f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                               f"fit the base model ({d_in} -> {d_out}); was it trained on another base?")
        if r > max_rank:
            raise AdapterError(f"rank {r} exceeds the engine's max_lora_rank {max_rank}")
        name = module_name(layer, module)
        alpha = _pattern_value(config.get("alpha_pattern"), name, alpha_default)
        rank_cfg = _pattern_value(config.get("rank_pattern"), name, r_default)
        if rank_cfg != r:
            raise AdapterError(f"layer {layer} {module}: config says rank {rank_cfg}, weights have rank {r}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[(layer, module)] = (a.to(dtype).contiguous(), b.t().to(dtype).contiguous(), float(scale))
    return AdapterWeights(adapter_id, sha256, nbytes, modules)


def read_adapter(root: str, adapter_id: str, args: ModelArgs, dtype: torch.dtype, max_rank: int,
                 storage_options: dict | None = None, base_model_name: str | None = None) -> AdapterWeights:
    """Read `<root>/<adapter_id>/` from any fsspec URL; every failure becomes an AdapterError."""
    if not ADAPTER_ID.fullmatch(adapter_id or ""):
        raise AdapterError(f"adapter_id {adapter_id!r} is not a plain name ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})")
    fs, base = fsspec.core.url_to_fs(f"{root.rstrip('/')}/{adapter_id}", **(storage_options or {}))
    if not fs.isdir(base):
        raise AdapterError(f"adapter {adapter_id!r} not found under {root}")
    if not fs.exists(f"{base}/adapter_config.json"):
        raise AdapterError(f"adapter {adapter_id!r} has no adapter_config.json")
    if not fs.exists(f"{base}/adapter_model.safetensors"):
        pickled = fs.exists(f"{base}/adapter_model.bin")
        raise AdapterError(f"adapter {adapter_id!r} has no adapter_model.safetensors"
                           + (" (only a pickle adapter_model.bin, which is never unpickled: re-save it with"
                              " safe_serialization=True)" if pickled else ""))
    try:
        config = json.loads(fs.cat_file(f"{base}/adapter_config.json"))
        raw = fs.cat_file(f"{base}/adapter_model.safetensors")
        tensors = load_safetensors_bytes(raw)
    except Exception as e:  # corrupt JSON, truncated or corrupt safetensors, storage errors
        raise AdapterError(f"adapter {adapter_id!r} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {adapter_id!r}: adapter_config.json is not a JSON object")
    return parse_adapter(adapter_id, config, tensors, args, dtype, hashlib.sha256(raw).hexdigest(), len(raw),
                         max_rank, base_model_name)


class AdapterStore:
    """Storage -> host-memory LRU (bounded in bytes). Reads, validates and packs adapters (`pack` turns
    AdapterWeights into what the device pool loads) in background threads ahead of need."""

    def __init__(self, root: str | None, args: ModelArgs, dtype: torch.dtype, max_rank: int,
                 host_cache_bytes: int, pack: Callable[[AdapterWeights], Any], storage_options: dict | None = None,
                 base_model_name: str | None = None):
        self.root, self.args, self.dtype, self.max_rank = root, args, dtype, max_rank
        self.base_model_name = base_model_name
        self.capacity, self.pack, self.storage_options = host_cache_bytes, pack, storage_options
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._failed: dict[str, str] = {}
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        # Reading, hashing and packing release the GIL, so threads scale with the host's cores.
        self.read_threads = max(2, min(8, os.cpu_count() or 2))
        self._reader = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="adapter-read")
        self.reads = 0

    def _read(self, adapter_id: str):
        if self.root is None:
            raise AdapterError(f"adapter {adapter_id!r} requested but no adapter root was given (--adapters)")
        try:
            return self.pack(read_adapter(self.root, adapter_id, self.args, self.dtype, self.max_rank,
                                          self.storage_options, self.base_model_name))
        except AdapterError:
            raise
        except Exception as e:  # noqa: BLE001 - a config field of the wrong type, a bad regex, storage: fail its rows
            raise AdapterError(f"adapter {adapter_id!r} cannot be used: {type(e).__name__}: {e}") from None

    def prefetch(self, adapter_ids) -> None:
        """Start reading adapters that will be needed soon (no-op for cached, failed or pending ones)."""
        with self._lock:
            for adapter_id in adapter_ids:
                if adapter_id not in self._cache and adapter_id not in self._failed and adapter_id not in self._pending:
                    self._pending[adapter_id] = self._reader.submit(self._read, adapter_id)

    def get(self, adapter_id: str):
        """The packed adapter (from the cache, a read under way, or read now); AdapterError if unusable."""
        with self._lock:
            if adapter_id in self._failed:
                raise AdapterError(self._failed[adapter_id])
            if adapter_id in self._cache:
                self._cache.move_to_end(adapter_id)
                return self._cache[adapter_id]
            future = self._pending.pop(adapter_id, None)
        try:
            packed = future.result() if future else self._read(adapter_id)
        except AdapterError as e:
            self._failed[adapter_id] = str(e)
            raise
        with self._lock:
            self.reads += 1
            self._cache[adapter_id] = packed
            while sum(p.nbytes for p in self._cache.values()) > self.capacity and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return packed

    def close(self) -> None:
        # Waits for reads under way: one still pinning memory could break the next engine's graph capture.
        self._reader.shutdown(wait=True, cancel_futures=True)
