import pytest
import torch

from kernels.decode_attention import (
    decode_num_splits,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
)

from .attention_cases import naive_paged_attention
from .helpers import assert_close, make_paged_kv, randn

DTYPES = [torch.float32, torch.float16]
# Block size 16: lengths 1, block - 1, block, block + 1, several blocks, and 0 (a CUDA-graph padding row).
RAGGED = [1, 15, 16, 17, 50, 0]
# (Hq, Hk, D): GQA 4/2 at both head sizes in the default run; the full geometries are in the slow cases.
SMALL_GEOMETRIES = [(4, 2, 128), (4, 2, 64)]


def check(hq, hk, d, dtype, device, context_lens, window, num_splits, block_n, seed=0):
    k_cache, v_cache, block_tables, ctx = make_paged_kv(context_lens, hk, d, dtype, device, seed=seed)
    q = randn(len(context_lens), hq, d, dtype=dtype, device=device, seed=seed + 1)
    scale = d**-0.5
    out = paged_decode_attention_triton(
        q, k_cache, v_cache, block_tables, ctx, scale, window, num_splits, block_n=block_n
    )
    cpu = [t.cpu() for t in (q, k_cache, v_cache, block_tables, ctx)]
    ref = paged_decode_attention_reference(*cpu, scale, window)
    assert not out.isnan().any()
    assert_close(out.cpu(), ref)


def test_reference_matches_naive():
    context_lens = [1, 15, 16, 17, 40, 0]
    k_cache, v_cache, block_tables, ctx = make_paged_kv(
        context_lens, 2, 32, torch.float32, torch.device("cpu")
    )
    q = randn(len(context_lens), 4, 32, dtype=torch.float32, device="cpu", seed=1)
    cu = torch.arange(len(context_lens) + 1, dtype=torch.int32)
    for window in (0, 8):
        ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, ctx, 0.3, window)
        torch.testing.assert_close(
            ref, naive_paged_attention(q, k_cache, v_cache, block_tables, cu, ctx, 0.3, window)
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", SMALL_GEOMETRIES)
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode(hq, hk, d, dtype, window, num_splits, device, poison_empty):
    # block_n = 16 gives several tiles per split and non-empty middle splits at these short lengths.
    check(hq, hk, d, dtype, device, RAGGED, window, num_splits, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_mha_default_tiles(dtype, device, poison_empty):
    # MHA (group 1, the codec decoder's layout), automatic split count, the production tile of 64 keys.
    check(2, 2, 64, dtype, device, [3, 64, 100, 16], 0, 0, block_n=64, seed=4)


def test_num_splits_heuristic():
    cpu = torch.device("cpu")  # stands in for a 132-SM GPU
    assert decode_num_splits(64, 8, 2048, cpu) == 1  # 512 programs already fill the GPU
    assert decode_num_splits(1, 8, 2048, cpu) == 8  # one sequence: split, but keep >= 256 keys per split
    assert decode_num_splits(1, 8, 64, cpu) == 1  # short contexts are not worth a merge
    assert 1 <= decode_num_splits(16, 8, 512, cpu) <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic is wrong in the interpreter")
@pytest.mark.parametrize("num_splits", [1, 4])
def test_bf16_on_gpu(num_splits, device):
    check(16, 8, 128, torch.bfloat16, device, [1, 15, 16, 17, 300, 1000, 0], 0, num_splits, block_n=64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [0, 1])
def test_talker_geometry(dtype, num_splits, device, poison_empty):
    # Qwen3 talker: 16 query heads over 8 KV heads, head_dim 128, up to a few hundred frames.
    check(16, 8, 128, dtype, device, [1, 15, 16, 17, 130, 300, 513, 0], 0, num_splits, block_n=64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_talker_long_context(dtype, device, poison_empty):
    # Context 2048 (the bench's longest) with the automatic split count (9 splits here) and 64-key tiles.
    check(16, 8, 128, dtype, device, [2048, 1000, 1], 0, 0, block_n=64, seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_codec_decoder_geometry(dtype, device, poison_empty):
    # Codec decoder transformer: MHA 16/16, head_dim 64, sliding window 72.
    check(16, 16, 64, dtype, device, [1, 71, 72, 73, 200, 0], 72, 3, block_n=32)
