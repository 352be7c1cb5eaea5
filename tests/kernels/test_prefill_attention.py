import pytest
import torch

from kernels.decode_attention import paged_decode_attention_reference
from kernels.prefill_attention import paged_prefill_attention_reference, paged_prefill_attention_triton

from .attention_cases import naive_paged_attention
from .helpers import assert_close, make_paged_kv, randn

DTYPES = [torch.float32, torch.float16]
# (new tokens, context length) per sequence. Context lengths cover 1, block - 1, block, block + 1 and
# several blocks; sequences extend a cached prefix (5 new of 17, 20 new of 50) or start fresh.
RAGGED = [(1, 1), (15, 15), (5, 17), (16, 16), (20, 50)]


def cu_seqlens(q_lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def check(hq, hk, d, dtype, device, seqs, block_m, block_n, seed=0):
    q_lens, context_lens = [s[0] for s in seqs], [s[1] for s in seqs]
    k_cache, v_cache, block_tables, ctx = make_paged_kv(context_lens, hk, d, dtype, device, seed=seed)
    q = randn(sum(q_lens), hq, d, dtype=dtype, device=device, seed=seed + 1)
    cu = cu_seqlens(q_lens, device)
    scale = d**-0.5
    out = paged_prefill_attention_triton(
        q, k_cache, v_cache, block_tables, cu, ctx, scale, block_m=block_m, block_n=block_n
    )
    cpu = [t.cpu() for t in (q, k_cache, v_cache, block_tables, cu, ctx)]
    ref = paged_prefill_attention_reference(*cpu, scale)
    assert not out.isnan().any()
    assert_close(out.cpu(), ref)


# The second batch is all fresh prompts of one length: the reference's unmasked is_causal shortcut.
@pytest.mark.parametrize("seqs", [[(1, 1), (3, 15), (5, 17), (16, 16), (4, 40)], [(19, 19), (19, 19)]])
def test_reference_matches_naive(seqs):
    q_lens, context_lens = [s[0] for s in seqs], [s[1] for s in seqs]
    k_cache, v_cache, block_tables, ctx = make_paged_kv(
        context_lens, 2, 32, torch.float32, torch.device("cpu")
    )
    q = randn(sum(q_lens), 4, 32, dtype=torch.float32, device="cpu", seed=1)
    cu = cu_seqlens(q_lens, "cpu")
    ref = paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu, ctx, 0.3)
    torch.testing.assert_close(ref, naive_paged_attention(q, k_cache, v_cache, block_tables, cu, ctx, 0.3))


def test_decode_is_prefill_with_one_token():
    context_lens = [1, 17, 33]
    k_cache, v_cache, block_tables, ctx = make_paged_kv(
        context_lens, 2, 64, torch.float32, torch.device("cpu")
    )
    q = randn(3, 4, 64, dtype=torch.float32, device="cpu", seed=1)
    cu = torch.arange(4, dtype=torch.int32)
    torch.testing.assert_close(
        paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu, ctx, 0.125),
        paged_decode_attention_reference(q, k_cache, v_cache, block_tables, ctx, 0.125),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 128), (4, 2, 64)])
def test_prefill(hq, hk, d, dtype, device, poison_empty):
    # block_m = 16 packs 8 tokens x 2 heads per program, so sequences span several query blocks.
    check(hq, hk, d, dtype, device, RAGGED, block_m=16, block_n=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_default_tiles_mha(dtype, device, poison_empty):
    # Production tile sizes and MHA (group 1): a long fresh prompt and a chunk extending a prefix.
    check(2, 2, 64, dtype, device, [(70, 70), (33, 90)], block_m=64, block_n=32, seed=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic is wrong in the interpreter")
def test_bf16_on_gpu(device):
    check(16, 8, 128, torch.bfloat16, device, [(100, 100), (1, 300), (64, 513)], block_m=64, block_n=32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_talker_geometry(dtype, device, poison_empty):
    # Qwen3 talker 16/8 x 128: a fresh voice prompt, a continuation chunk over a cached prefix, one token.
    check(16, 8, 128, dtype, device, [(150, 150), (40, 200), (1, 17)], block_m=64, block_n=32)


@pytest.mark.slow
def test_talker_long_prompt(device, poison_empty):
    # A 512-token voice prompt in one chunk at the production tile sizes.
    check(16, 8, 128, torch.float16, device, [(512, 512)], block_m=64, block_n=32, seed=3)
