"""RMSNorm, plain and fused with the residual add.

Math (per row x of width H, weight w, all in fp32):

    rms_norm(x)              = w * round(x * rsqrt(mean(x^2) + eps))
    fused_add_rms_norm(x, r) = (rms_norm(s), s)   with s = round(x + r)

``round`` casts to the input dtype. This is the Hugging Face Qwen3/Llama order: normalise in fp32,
cast to the activation dtype, then multiply by the weight (``weight * x_normed.to(input_dtype)``). The
product of two 16-bit floats is exact in fp32, so multiplying in fp32 and rounding once gives the same
bits as HF's 16-bit multiply. The output always has the input's dtype. The residual sum is rounded
before it is normalised, again as HF does (it adds in the activation dtype), so the new residual and
the normed output agree with an unfused HF layer bit for bit in fp32 and up to rsqrt rounding in
16-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_triton_device, eager_reference_on_cpu, next_power_of_2, row_num_warps


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    n_cols,
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row: y = w * round(x * rsqrt(mean(x^2) + eps)), optionally x <- round(x + r) first."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, s, mask=mask)
        # Normalise the rounded sum: that is what the next HF layer would see.
        x = s.to(tl.float32)
    # Masked lanes are 0, so the sum is over the real columns only; divide by the real width.
    mean_square = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.math.rsqrt(mean_square + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``[..., H]`` as ``[N, H]`` without copying: rows may be strided, columns must be dense."""
    rows = t.reshape(-1, t.shape[-1])
    assert rows.stride(-1) == 1, "the last dimension must be contiguous"
    return rows


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dtype in FLOAT_DTYPES, f"unsupported dtype {x.dtype}"
    assert weight.dim() == 1 and weight.shape[0] == x.shape[-1], (
        f"weight {tuple(weight.shape)} does not match hidden size {x.shape[-1]}"
    )
    assert weight.is_contiguous() and weight.device == x.device


def _launch(x, residual, weight, eps, out, residual_out):
    check_triton_device(x, weight)
    x2, out2 = _as_rows(x), _as_rows(out)
    n_rows, n_cols = x2.shape
    if n_rows == 0:
        return
    block = next_power_of_2(n_cols)
    assert block <= 65536, "row too wide for a one-row-per-program kernel"
    if residual is not None:
        r2, r_out2 = _as_rows(residual), _as_rows(residual_out)
    else:
        # Dummy pointers: the HAS_RESIDUAL=False branch is compiled away and never touches them.
        r2, r_out2 = x2, out2
    _rms_norm_kernel[(n_rows,)](
        x2, r2, weight, out2, r_out2, n_cols,
        x2.stride(0), r2.stride(0), out2.stride(0), r_out2.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=row_num_warps(block),
    )  # fmt: skip


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dimension of ``x`` (any leading shape). Returns a new tensor."""
    _check(x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, eps, out, None)
    return out


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``s = x + residual; (rms_norm(s), s)`` in one pass. Returns new tensors (out, new_residual)."""
    _check(x, weight)
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, residual, weight, eps, out, residual_out)
    return out, residual_out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch RMSNorm, computed exactly like HF Qwen3: fp32 normalise, cast, then weight multiply."""
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    normed = (xf * torch.rsqrt(variance + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype).contiguous()


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch ``s = x + residual; (rms_norm(s), s)``; the sum is rounded to the input dtype first."""
    s = (x.float() + residual.float()).to(x.dtype).contiguous()
    return rms_norm_reference(s, weight, eps), s


# Public ops: one opaque node each for torch.compile and CUDA graphs. The default implementation is the
# reference (CPU and anything else); CUDA tensors go to Triton.


@torch.library.custom_op("makima::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * round(x * rsqrt(mean(x^2, -1) + eps))`` over the last dim; output dtype = ``x.dtype``."""
    return rms_norm_reference(x, weight, eps)


@torch.library.custom_op("makima::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = round(x + residual)``; returns ``(rms_norm(s, weight, eps), s)``."""
    return fused_add_rms_norm_reference(x, residual, weight, eps)


rms_norm_op.register_kernel("cuda")(rms_norm_triton)
fused_add_rms_norm_op.register_kernel("cuda")(fused_add_rms_norm_triton)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


rms_norm = eager_reference_on_cpu(rms_norm_op, rms_norm_reference)


fused_add_rms_norm = eager_reference_on_cpu(fused_add_rms_norm_op, fused_add_rms_norm_reference)
