"""RMSNorm with the residual add fused in: one read of x and the residual, one write of each."""
import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference.

    x [T, H]; residual [T, H] or None; weight [H]. With a residual: residual += x in place (in x's dtype),
    and s = that sum; without: s = x. out = weight * (s / sqrt(mean(s^2) + eps)), normalized in float32 and
    cast to x's dtype before the weight multiplies (as transformers does). Returns (out, s): s is the next
    residual.
    """
    if residual is not None:
        residual += x
        x = residual
    s = x.float()
    return weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), x


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # one program per row: the mean needs the whole row, and a row of a 7B (4096) is one 8-16 KB tile
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)        # rounded as the reference's add
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    s = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(s * s, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = w * (s * inv_rms).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@torch.inference_mode()
def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of rms_norm_ref (same arguments, result and in-place residual update)."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.shape == (x.shape[1],) and weight.is_contiguous()
    assert residual is None or (residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows, cols = x.shape
    if rows:
        block = triton.next_power_of_2(cols)
        _rms_norm_kernel[(rows,)](x, x if residual is None else residual, weight, out, cols, eps, x.stride(0),
                                  0 if residual is None else residual.stride(0), out.stride(0),
                                  HAS_RESIDUAL=residual is not None, BLOCK=block,
                                  num_warps=min(max(block // 256, 1), 16))
    return out, x if residual is None else residual
