import pytest
import torch

from kernels.norm import (
    fused_add_rms_norm_reference,
    fused_add_rms_norm_triton,
    rms_norm_reference,
    rms_norm_triton,
)

from .helpers import assert_close, randn

EPS = 1e-6
DTYPES = [torch.float32, torch.float16]


def hf_qwen3_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3RMSNorm.forward from transformers, restated."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
def test_reference_matches_hf_order(dtype):
    x = randn(6, 1024, dtype=dtype, device="cpu", scale=3.0)
    w = randn(1024, dtype=dtype, device="cpu", seed=1)
    torch.testing.assert_close(rms_norm_reference(x, w, EPS), hf_qwen3_rms_norm(x, w, EPS), atol=0, rtol=0)
    r = randn(6, 1024, dtype=dtype, device="cpu", seed=2)
    out, residual = fused_add_rms_norm_reference(x, r, w, EPS)
    torch.testing.assert_close(residual, x + r, atol=0, rtol=0)
    torch.testing.assert_close(out, hf_qwen3_rms_norm(x + r, w, EPS), atol=0, rtol=0)


# (leading shape, hidden): one token at the 0.6B and 1.7B talker widths, a ragged prefill with a width that
# is not a power of two, 3D input.
SHAPES = [((1,), 1024), ((1,), 2048), ((7,), 1000), ((2, 3), 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,hidden", SHAPES)
def test_rms_norm(lead, hidden, dtype, device, poison_empty):
    x = randn(*lead, hidden, dtype=dtype, device=device, scale=2.0)
    w = randn(hidden, dtype=dtype, device=device, seed=1)
    assert_close(rms_norm_triton(x, w, EPS), rms_norm_reference(x, w, EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,hidden", SHAPES)
def test_fused_add_rms_norm(lead, hidden, dtype, device, poison_empty):
    x = randn(*lead, hidden, dtype=dtype, device=device, scale=2.0)
    r = randn(*lead, hidden, dtype=dtype, device=device, seed=2)
    w = randn(hidden, dtype=dtype, device=device, seed=1)
    out, residual = fused_add_rms_norm_triton(x, r, w, EPS)
    ref_out, ref_residual = fused_add_rms_norm_reference(x, r, w, EPS)
    assert_close(residual, ref_residual)
    assert_close(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype, device, poison_empty):
    # Rows of a wider buffer (e.g. a slice of a fused projection): the kernel follows the row stride.
    hidden = 256
    x = randn(5, 3 * hidden, dtype=dtype, device=device)[:, hidden : 2 * hidden]
    r = randn(5, 2 * hidden, dtype=dtype, device=device, seed=2)[:, :hidden]
    w = randn(hidden, dtype=dtype, device=device, seed=1)
    assert_close(rms_norm_triton(x, w, EPS), rms_norm_reference(x, w, EPS))
    out, residual = fused_add_rms_norm_triton(x, r, w, EPS)
    ref_out, ref_residual = fused_add_rms_norm_reference(x, r, w, EPS)
    assert_close(residual, ref_residual)
    assert_close(out, ref_out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic is wrong in the interpreter")
def test_bf16_on_gpu(device):
    x = randn(33, 1024, dtype=torch.bfloat16, device=device)
    r = randn(33, 1024, dtype=torch.bfloat16, device=device, seed=2)
    w = randn(1024, dtype=torch.bfloat16, device=device, seed=1)
    assert_close(rms_norm_triton(x, w, EPS), rms_norm_reference(x, w, EPS))
    out, residual = fused_add_rms_norm_triton(x, r, w, EPS)
    assert_close(residual, fused_add_rms_norm_reference(x, r, w, EPS)[1])
    assert_close(out, fused_add_rms_norm_reference(x, r, w, EPS)[0])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_qwen3_prefill_rows(dtype, device, poison_empty):
    # A 256-token prefill at the talker's hidden size.
    x = randn(256, 1024, dtype=dtype, device=device)
    r = randn(256, 1024, dtype=dtype, device=device, seed=2)
    w = randn(1024, dtype=dtype, device=device, seed=1)
    out, residual = fused_add_rms_norm_triton(x, r, w, EPS)
    ref_out, ref_residual = fused_add_rms_norm_reference(x, r, w, EPS)
    assert_close(residual, ref_residual)
    assert_close(out, ref_out)
