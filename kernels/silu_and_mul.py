"""SiLU of the gate times the up projection, from the fused gate_up output, in one pass."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Pure-torch reference. gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I] in gate_up's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, n_cols, stride_in, stride_out, BLOCK: tl.constexpr):
    # grid: (token, column block)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gate_up_ptr + t * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + t * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + t * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@torch.inference_mode()
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton version of silu_and_mul_ref (same argument and result)."""
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0 and gate_up.stride(1) == 1
    tokens, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, n_cols, dtype=gate_up.dtype, device=gate_up.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(n_cols))
        _silu_and_mul_kernel[(tokens, triton.cdiv(n_cols, block))](gate_up, out, n_cols, gate_up.stride(0),
                                                                   out.stride(0), BLOCK=block, num_warps=4)
    return out
