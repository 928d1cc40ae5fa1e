"""A PEFT adapter_config.json: where an adapter lives, what it targets, its ranks and scales, what is refused.

Everything here is cheap and bounded, so the planner can size thousands of adapters from their configs and
a hostile config is refused before any weight is read: the file is read up to CONFIG_MAX_BYTES, ranks are
checked against max_lora_rank before any layout is made for them, and the adapter's own regular expressions
(target_modules, rank_pattern, alpha_pattern) run with a time budget, never with unbounded backtracking.
"""
import json
import math
import os
import re
import time
from functools import lru_cache

import fsspec
import regex

from engine.model import LORA_GROUPS, ModelArgs

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LORA_MODULES = tuple(m for members in LORA_GROUPS.values() for m in members)
CONFIG_MAX_BYTES = 1 << 20
PATTERN_MAX_CHARS = 1024
PATTERN_MAX_REPEATS = 10_000   # product of all counted repeats {m,n}: the `regex` compiler unrolls them
PATTERN_BUDGET_S = 0.25        # all of one adapter's pattern matching
COUNTED_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


class AdapterError(Exception):
    """An adapter that cannot be used; the message says why and what to do."""


def module_name(layer: int, module: str) -> str:
    """The module's name in a transformers Llama-family model, which PEFT's patterns match against."""
    block = "mlp" if module in LORA_GROUPS["gate_up"] + LORA_GROUPS["down"] else "self_attn"
    return f"model.layers.{layer}.{block}.{module}"


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> "regex.Pattern":
    """Python's re decides what the pattern means (PEFT matches with re); `regex` runs it with a timeout."""
    if len(pattern) > PATTERN_MAX_CHARS:
        raise AdapterError(f"pattern of {len(pattern)} characters (at most {PATTERN_MAX_CHARS})")
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise AdapterError(f"{pattern!r} is not a valid regular expression: {e}") from None
    repeats = math.prod(max(int(n or 0) for n in m.groups() if n is not None) or 1
                        for m in COUNTED_REPEAT.finditer(pattern))
    if repeats > PATTERN_MAX_REPEATS:
        raise AdapterError(f"{pattern!r} repeats too much ({{m,n}} counts multiply to {repeats:,}; module names "
                           f"are short): list the modules instead")
    try:
        return regex.compile(pattern)
    except Exception as e:  # noqa: BLE001 - RecursionError on deep nesting, regex's own errors
        raise AdapterError(f"{pattern!r} cannot be compiled: {type(e).__name__}: {e}") from None


class PatternMatcher:
    """Runs one adapter's patterns against module names within PATTERN_BUDGET_S in all."""

    def __init__(self, budget_s: float = PATTERN_BUDGET_S):
        self.deadline = time.monotonic() + budget_s

    def _run(self, pattern: str, name: str, full: bool, field: str) -> bool:
        try:
            compiled = _compile(pattern)
        except AdapterError as e:
            raise AdapterError(f"{field}: {e}") from None
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            match = compiled.fullmatch if full else compiled.match
            return match(name, timeout=remaining) is not None
        except TimeoutError:
            raise AdapterError(f"{field} pattern {pattern[:80]!r} takes too long to match module names (nested "
                               f"quantifiers backtrack): list the modules instead") from None

    def fullmatch(self, pattern: str, name: str, field: str = "target_modules") -> bool:
        return self._run(pattern, name, True, field)

    def pattern_value(self, patterns: dict | None, name: str, default, field: str):
        """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
        if patterns is not None and not isinstance(patterns, dict):
            raise AdapterError(f"{field} must be a JSON object, got {type(patterns).__name__}")
        for key, value in (patterns or {}).items():
            if self._run(rf"(.*\.)?({key})$", name, False, field):
                return value
        return default


def check_rank(value, where: str, max_rank: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{where} must be an integer rank, got {value!r}")
    if value < 1:
        raise AdapterError(f"{where} = {value}: a LoRA needs rank >= 1")
    if value > max_rank:
        raise AdapterError(f"{where} = {value} exceeds the engine's max_lora_rank {max_rank} (--max-lora-rank)")
    return value


def check_alpha(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def lora_scale(config: dict, alpha: float, rank: int) -> float:
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def configured_ranks(config: dict, args: ModelArgs, max_rank: int,
                     matcher: PatternMatcher | None = None) -> dict[tuple[int, str], int]:
    """Rank of each (layer, module) an adapter_config.json targets, rank_pattern applied: what the adapter
    will hold, known before its weights are read (the planner sizes adapters with it). Every rank is checked
    against max_rank here, so nothing is ever laid out for a rank the engine would refuse."""
    matcher = matcher or PatternMatcher()
    targets = config.get("target_modules") or []
    if not isinstance(targets, (str, list)) or isinstance(targets, list) and \
            not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"target_modules must be a list of module names or a pattern, got {targets!r:.80}")
    default = check_rank(config.get("r", 8), "r", max_rank)

    def targeted(name: str) -> bool:
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return matcher.fullmatch(targets, name)
        return any(name == t or name.endswith(f".{t}") for t in targets)

    ranks = {}
    for layer in range(args.num_layers):
        for module in LORA_MODULES:
            name = module_name(layer, module)
            if targeted(name):
                rank = matcher.pattern_value(config.get("rank_pattern"), name, default, "rank_pattern")
                ranks[(layer, module)] = check_rank(rank, f"rank_pattern for {name}", max_rank)
    return ranks


def same_base(adapter_base: str, base_model_name: str) -> bool:
    """Whether an adapter's base_model_name_or_path names this base: hub ids and paths are compared by their
    last component ("meta-llama/Llama-2-7b-hf" is "/models/llama-2-7b-hf"), as the training machine's
    path is rarely the serving one's."""
    def name(text: str) -> str:
        return text.rstrip("/").rsplit("/", 1)[-1].lower()
    return name(adapter_base) == name(base_model_name)


def check_config(config: dict, base_model_name: str | None, max_rank: int, matcher: PatternMatcher) -> None:
    """Refuse what lorafleet cannot run, cheapest facts first (before any weight is read)."""
    given = config.get("base_model_name_or_path")
    if base_model_name and isinstance(given, str) and given and not same_base(given, base_model_name):
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
    check_rank(config.get("r", 8), "r", max_rank)
    check_alpha(config.get("lora_alpha", 8), "lora_alpha")
    targets = config.get("target_modules")
    for name in ("embed_tokens", "lm_head"):
        if isinstance(targets, str) and targets != "all-linear":
            hit = matcher.fullmatch(targets, name) or matcher.fullmatch(targets, f"model.{name}")
        else:
            hit = isinstance(targets, list) and name in targets
        if hit:
            raise AdapterError(f"LoRA on {name} is not supported (targets may be q,k,v,o,gate,up,down)")


def adapter_dir(root: str, adapter_id: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem,
                                                                                          str]:
    """The filesystem and path of `<root>/<adapter_id>`. On a local disk the folder, and the files in it, must
    resolve inside the adapter root: a symlink out of it is refused (the root is what the operator vouched for)."""
    if not ADAPTER_ID.fullmatch(adapter_id or ""):
        raise AdapterError(f"adapter_id {adapter_id!r} is not a plain name ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})")
    fs, base = fsspec.core.url_to_fs(f"{root.rstrip('/')}/{adapter_id}", **(storage_options or {}))
    if not fs.isdir(base):
        raise AdapterError(f"adapter {adapter_id!r} not found under {root}")
    if "file" in fs.protocol:
        real_root = os.path.realpath(os.path.dirname(base))
        for path in (base, f"{base}/adapter_config.json", f"{base}/adapter_model.safetensors"):
            if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
                raise AdapterError(f"adapter {adapter_id!r}: {os.path.basename(path)} is a symlink to "
                                   f"{os.path.realpath(path)}, outside the adapter root {real_root}; copy the "
                                   f"adapter into the root instead")
    return fs, base


def read_adapter_config(fs: fsspec.AbstractFileSystem, base: str, adapter_id: str) -> dict:
    """adapter_config.json as a dict (at most CONFIG_MAX_BYTES read)."""
    path = f"{base}/adapter_config.json"
    if not fs.exists(path):
        raise AdapterError(f"adapter {adapter_id!r} has no adapter_config.json")
    try:
        with fs.open(path, "rb") as f:
            raw = f.read(CONFIG_MAX_BYTES + 1)
        if len(raw) > CONFIG_MAX_BYTES:
            raise AdapterError(f"adapter {adapter_id!r}: adapter_config.json is over {CONFIG_MAX_BYTES >> 20} MiB")
        config = json.loads(raw)
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - bad JSON, bad UTF-8, storage errors
        raise AdapterError(f"adapter {adapter_id!r} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {adapter_id!r}: adapter_config.json is not a JSON object")
    return config
