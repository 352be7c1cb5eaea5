"""SiLU-and-multiply for a fused gate/up projection output (the SwiGLU MLP).

Math: for x = [g | u] with g, u of width I (the last dimension of x is 2I),

    silu_and_mul(x) = silu(g) * u = g * sigmoid(g) * u,

computed in fp32 and rounded once to the input dtype (vLLM's order; HF rounds silu(g) before the
multiply, which differs by at most one unit in the last place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_triton_device, eager_reference_on_cpu, next_power_of_2


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, width, stride_x, stride_out, BLOCK: tl.constexpr):
    """Grid (rows, column blocks): out[r, c] = silu(x[r, c]) * x[r, width + c]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor) -> None:
    assert x.dtype in FLOAT_DTYPES, f"unsupported dtype {x.dtype}"
    assert x.shape[-1] % 2 == 0, "the last dimension holds [gate | up] and must be even"


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(x[..., :I]) * x[..., I:]``; returns a new ``[..., I]`` tensor."""
    _check(x)
    check_triton_device(x)
    width = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    x2, out2 = x.reshape(-1, 2 * width), out.view(-1, width)
    assert x2.stride(-1) == 1, "the last dimension must be contiguous"
    if x2.shape[0] == 0:
        return out
    # Column blocks keep registers bounded for wide MLPs (I = 3072 for a 0.6B Qwen3) and give a
    # batch-1 decode step more than one program.
    block = min(1024, next_power_of_2(width))
    grid = (x2.shape[0], triton.cdiv(width, block))
    _silu_and_mul_kernel[grid](x2, out2, width, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=4)
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """PyTorch ``silu(g) * u`` in fp32, rounded once to ``x.dtype``."""
    _check(x)
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype).contiguous()


@torch.library.custom_op("makima::silu_and_mul", mutates_args=())
def silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` with fp32 math; output ``[..., I]`` in ``x.dtype``."""
    return silu_and_mul_reference(x)


silu_and_mul_op.register_kernel("cuda")(silu_and_mul_triton)


@silu_and_mul_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


silu_and_mul = eager_reference_on_cpu(silu_and_mul_op, silu_and_mul_reference)
