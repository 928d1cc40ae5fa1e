"""Compile every kernel configuration the wrappers launch for an H100 (sm_90), without a GPU.

Run as a script in a process without TRITON_INTERPRET (test_compile_for_h100.py does so): each kernel's
launch is replaced by an ahead-of-time triton.compile of the same arguments and constexprs, then the
wrappers are called on small CPU tensors of each dtype and form. This catches what the interpreter never
checks, as it never lowers to PTX: types, tl.dot shapes, shared memory.
"""
import importlib
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.lora import DECODE_TILE, PREFILL_TILE
from kernels import (lora_expand, lora_shrink, paged_attention_decode, paged_prefill_attention, prefill_attention,
                     rms_norm, rope_and_store_kv, scatter_rows, silu_and_mul)

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64"}
H100 = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 227 * 1024
LAUNCH_OPTIONS = ("num_warps", "num_stages")   # launch keywords that are compile options, not constexprs


class CompileInsteadOfLaunch:
    def __init__(self, module, name: str):
        self.kernel, self.compiled = getattr(module, name), []
        setattr(module, name, self)

    def __getitem__(self, grid):
        return self.compile

    def compile(self, *args, **keywords):
        options = {k: keywords.pop(k) for k in LAUNCH_OPTIONS if k in keywords}
        constexprs, names = keywords, self.kernel.arg_names
        signature = {name: "constexpr" if name in constexprs else self.type_of(arg)
                     for name, arg in zip(names, list(args) + [None] * len(constexprs))}
        source = ASTSource(self.kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=H100, options=options)
        assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT, (self.kernel.__name__, constexprs, options)
        self.compiled.append((self.kernel.__name__, signature, {**constexprs, **options}, compiled.metadata.shared))

    @staticmethod
    def type_of(arg) -> str:
        if isinstance(arg, torch.Tensor):
            return "*" + TRITON_TYPES[arg.dtype]
        if isinstance(arg, float):
            return "fp32"
        return "i64" if abs(arg) >= 2 ** 31 else "i32"


def main() -> None:
    # the package exports each module's function under the module's name, so reach the modules by import
    launches = [CompileInsteadOfLaunch(importlib.import_module(f"kernels.{module}"), kernel) for module, kernel in [
        ("lora_shrink", "_shrink_kernel"), ("lora_expand", "_expand_kernel"),
        ("paged_attention", "_paged_decode_kernel"), ("paged_attention", "_reduce_splits_kernel"),
        ("prefill_attention", "_prefill_kernel"), ("paged_prefill_attention", "_paged_prefill_kernel"),
        ("rms_norm", "_rms_norm_kernel"), ("rope_kv", "_rope_kv_kernel"), ("silu_and_mul", "_silu_and_mul_kernel"),
        ("adapter_rows", "_scatter_rows_kernel")]]
    ints = dict(dtype=torch.int32)
    for dtype in (torch.bfloat16, torch.float32):                 # fp16 lowers as bf16 does
        pool = torch.zeros(4096, dtype=dtype)
        a_rows = torch.zeros(3, 4, 64, dtype=torch.int64)
        ranks, scales = torch.ones(3, 4, **ints), torch.ones(3, 4)
        for tile_size in (DECODE_TILE, PREFILL_TILE):
            tiles = torch.tensor([[0, 0, tile_size]], **ints)
            x = torch.zeros(tile_size, 1024, dtype=dtype)
            for split_k in (1, 4):
                xa = torch.zeros(split_k, 3, tile_size, 64)
                lora_shrink(x, pool, a_rows, ranks, tiles, tile_size, xa)
                lora_expand(torch.zeros(tile_size, 96, dtype=dtype), xa, pool, a_rows, ranks, scales, tiles,
                            tile_size, (0, 32, 64, 96))
        kv = torch.zeros(4, 2, 16, 2, 128, dtype=dtype)
        for batch, max_blocks in [(3, 2), (1, 256)]:                             # one pass; context splits
            paged_attention_decode(torch.zeros(batch, 8, 128, dtype=dtype), kv[:, 0], kv[:, 1],
                                   torch.zeros(batch, max_blocks, **ints), torch.ones(batch, **ints), 0.1)
        x = torch.zeros(5, 4096, dtype=dtype)
        rms_norm(x, None, x[0], 1e-5)
        rms_norm(x, x.clone(), x[0], 1e-5)
        qkv = torch.zeros(5, 12, 128, dtype=dtype)
        rope_and_store_kv(qkv[:, :8], qkv[:, 8:10], qkv[:, 10:], x[:, :128], x[:, :128], kv[:, 0], kv[:, 1],
                          torch.zeros(5, dtype=torch.int64))
        silu_and_mul(torch.zeros(5, 2 * 11008, dtype=dtype))
        q = torch.zeros(10, 8, 128, dtype=dtype)
        prefill_attention(q, q[:, :2], q[:, 2:4], torch.tensor([0, 10], **ints), 10, 0.1)
        paged_prefill_attention(q, kv[:, 0], kv[:, 1], torch.zeros(1, 2, **ints), torch.tensor([0, 10], **ints),
                                torch.tensor([20], **ints), 10, 0.1)
        rows = torch.zeros(4, dtype=torch.int64)
        for src_dtype in (torch.bfloat16, torch.float16, torch.float32):      # adapter files of any float dtype
            scatter_rows(pool, torch.zeros(64, dtype=src_dtype), rows, rows, rows, rows, 64)
    for launch in launches:
        for name, _, constexprs, shared in launch.compiled:
            print(f"{name} {constexprs} shared={shared}")
    sys.exit(0 if all(launch.compiled for launch in launches) else 1)


if __name__ == "__main__":
    main()
