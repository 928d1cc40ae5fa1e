"""Kernels the engine calls, each a Triton kernel beside a pure-torch reference of the same signature.

`kernel_ops(use_triton)` picks one set; the engine uses Triton on CUDA and the references on CPU.
Importing this package needs triton installed but no GPU (kernels compile on first launch); on CPU the
Triton set runs only under TRITON_INTERPRET=1, set before triton is first imported.
"""
from types import SimpleNamespace

from kernels.adapter_rows import scatter_rows, scatter_rows_ref
from kernels.lora_expand import lora_expand, lora_expand_ref
from kernels.lora_shrink import lora_shrink, lora_shrink_ref, lora_split_k, lora_split_k_ref
from kernels.paged_attention import paged_attention_decode, paged_attention_decode_ref
from kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from kernels.prefill_attention import prefill_attention, prefill_attention_ref
from kernels.rms_norm import rms_norm, rms_norm_ref
from kernels.rope_kv import rope_and_store_kv, rope_and_store_kv_ref
from kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref

REFERENCE_OPS = SimpleNamespace(lora_shrink=lora_shrink_ref, lora_expand=lora_expand_ref, lora_split_k=lora_split_k_ref,
                                paged_attention_decode=paged_attention_decode_ref,
                                prefill_attention=prefill_attention_ref,
                                paged_prefill_attention=paged_prefill_attention_ref, rms_norm=rms_norm_ref,
                                rope_and_store_kv=rope_and_store_kv_ref, silu_and_mul=silu_and_mul_ref,
                                scatter_rows=scatter_rows_ref)
TRITON_OPS = SimpleNamespace(lora_shrink=lora_shrink, lora_expand=lora_expand, lora_split_k=lora_split_k,
                             paged_attention_decode=paged_attention_decode,
                             prefill_attention=prefill_attention,
                             paged_prefill_attention=paged_prefill_attention, rms_norm=rms_norm,
                             rope_and_store_kv=rope_and_store_kv, silu_and_mul=silu_and_mul, scatter_rows=scatter_rows)


def kernel_ops(use_triton: bool) -> SimpleNamespace:
    return TRITON_OPS if use_triton else REFERENCE_OPS
