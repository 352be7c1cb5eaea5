import pytest
import torch

from kernels.activation import silu_and_mul_reference, silu_and_mul_triton

from .helpers import assert_close, randn

DTYPES = [torch.float32, torch.float16]


def test_reference_is_swiglu():
    x = randn(4, 2 * 96, dtype=torch.float32, device="cpu", scale=3.0)
    gate, up = x[:, :96], x[:, 96:]
    torch.testing.assert_close(silu_and_mul_reference(x), torch.nn.functional.silu(gate) * up)


# One decode token at the 0.6B and 1.7B talkers' intermediate sizes (3072, 6144: three and six column
# blocks), a ragged width.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 3072), (1, 2 * 6144), (5, 2 * 1000), (2, 3, 2 * 64)])
def test_silu_and_mul(shape, dtype, device, poison_empty):
    x = randn(*shape, dtype=dtype, device=device, scale=3.0)
    out = silu_and_mul_triton(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(out, silu_and_mul_reference(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic is wrong in the interpreter")
def test_bf16_on_gpu(device):
    x = randn(64, 2 * 3072, dtype=torch.bfloat16, device=device, scale=3.0)
    assert_close(silu_and_mul_triton(x), silu_and_mul_reference(x))
