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


def check(hq, hk, d, dtype, device, context_lens, splits, block_n, seed=0):
    """``splits``: "one" keeps the block table as narrow as the contexts; "several" widens it (unused
    entries, never read) until the automatic count splits the context, as a wide engine table does."""
    k_cache, v_cache, block_tables, ctx = make_paged_kv(context_lens, hk, d, dtype, device, seed=seed)
    if splits == "several":
        unused = block_tables[:, -1:]  # make_paged_kv leaves the last columns unused (poisoned ids)
        block_tables = torch.cat([block_tables, unused.expand(-1, 64)], dim=1).contiguous()
    count = decode_num_splits(len(context_lens), hk, block_tables.shape[1] * k_cache.shape[1], device)
    assert (count > 1) == (splits == "several"), count
    q = randn(len(context_lens), hq, d, dtype=dtype, device=device, seed=seed + 1)
    scale = d**-0.5
    out = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, ctx, scale, block_n=block_n)
    cpu = [t.cpu() for t in (q, k_cache, v_cache, block_tables, ctx)]
    ref = paged_decode_attention_reference(*cpu, scale)
    assert not out.isnan().any()
    assert_close(out.cpu(), ref)


def test_reference_matches_naive():
    context_lens = [1, 15, 16, 17, 40, 0]
    k_cache, v_cache, block_tables, ctx = make_paged_kv(
        context_lens, 2, 32, torch.float32, torch.device("cpu")
    )
    q = randn(len(context_lens), 4, 32, dtype=torch.float32, device="cpu", seed=1)
    cu = torch.arange(len(context_lens) + 1, dtype=torch.int32)
    ref = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, ctx, 0.3)
    torch.testing.assert_close(ref, naive_paged_attention(q, k_cache, v_cache, block_tables, cu, ctx, 0.3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", SMALL_GEOMETRIES)
@pytest.mark.parametrize("splits", ["one", "several"])
def test_decode(hq, hk, d, dtype, splits, device, poison_empty):
    # block_n = 16 gives several tiles per split and non-empty middle splits at these short lengths.
    check(hq, hk, d, dtype, device, RAGGED, splits, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_mha_default_tiles(dtype, device, poison_empty):
    # MHA (group 1), the production tile of 64 keys.
    check(2, 2, 64, dtype, device, [3, 64, 100, 16], "one", block_n=64, seed=4)


def test_num_splits_heuristic():
    cpu = torch.device("cpu")  # stands in for a 132-SM GPU
    assert decode_num_splits(64, 8, 2048, cpu) == 1  # 512 programs already fill the GPU
    assert decode_num_splits(1, 8, 2048, cpu) == 8  # one sequence: split, but keep >= 256 keys per split
    assert decode_num_splits(1, 8, 64, cpu) == 1  # short contexts are not worth a merge
    assert 1 <= decode_num_splits(16, 8, 512, cpu) <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic is wrong in the interpreter")
@pytest.mark.parametrize("splits", ["one", "several"])
def test_bf16_on_gpu(splits, device):
    check(16, 8, 128, torch.bfloat16, device, [1, 15, 16, 17, 300, 1000, 0], splits, block_n=64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_talker_geometry(dtype, device, poison_empty):
    # Qwen3 talker: 16 query heads over 8 KV heads, head_dim 128, up to a few hundred frames.
    check(16, 8, 128, dtype, device, [1, 15, 16, 17, 130, 300, 513, 0], "several", block_n=64)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_talker_long_context(dtype, device, poison_empty):
    # Context 2048 (the bench's longest), 64-key tiles, the table widened to 194 blocks: 11 splits.
    check(16, 8, 128, dtype, device, [2048, 1000, 1], "several", block_n=64, seed=2)
