import pytest
import torch

from kernels.rope import qk_norm_rope_store_kv_reference, qk_norm_rope_store_kv_triton, rope_cos_sin_cache

from .helpers import assert_close, randn

EPS = 1e-6
DTYPES = [torch.float32, torch.float16]
MAX_POS = 4096


def hf_rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_qwen3_q_path(
    q: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, theta: float
) -> torch.Tensor:
    """HF Qwen3: q_norm (Qwen3RMSNorm over head_dim), then apply_rotary_pos_emb with cos/sin from
    Qwen3RotaryEmbedding (emb = cat(freqs, freqs)); q is [T, H, D] in fp32."""
    variance = q.pow(2).mean(-1, keepdim=True)
    q = weight * (q * torch.rsqrt(variance + EPS))
    head_dim = q.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    return q * cos + hf_rotate_half(q) * sin


def test_reference_matches_hf():
    hq, hk, d, theta = 16, 8, 128, 1e6
    qkv = randn(9, (hq + 2 * hk) * d, dtype=torch.float32, device="cpu")
    positions = torch.tensor([0, 1, 2, 17, 100, 511, 1000, 2047, 4095])
    qw, kw = (
        randn(d, dtype=torch.float32, device="cpu", seed=1),
        randn(d, dtype=torch.float32, device="cpu", seed=2),
    )
    heads = qkv.view(9, hq + 2 * hk, d).clone()
    cache = rope_cos_sin_cache(MAX_POS, d, theta)
    qk_norm_rope_store_kv_reference(qkv, positions, cache, hq, hk, qw, kw, EPS, None, None, None)
    out = qkv.view(9, hq + 2 * hk, d)
    torch.testing.assert_close(out[:, :hq], hf_qwen3_q_path(heads[:, :hq], qw, positions, theta))
    torch.testing.assert_close(
        out[:, hq : hq + hk], hf_qwen3_q_path(heads[:, hq : hq + hk], kw, positions, theta)
    )
    torch.testing.assert_close(out[:, hq + hk :], heads[:, hq + hk :], atol=0, rtol=0)


def run_both(qkv, positions, cache, hq, hk, qw, kw, k_cache, v_cache, slots):
    """Run kernel and reference on copies of the same inputs; return (triton tensors, reference tensors)."""
    results = []
    for fn in (qk_norm_rope_store_kv_triton, qk_norm_rope_store_kv_reference):
        q2 = qkv.clone()
        kc = k_cache.clone() if k_cache is not None else None
        vc = v_cache.clone() if v_cache is not None else None
        fn(q2, positions, cache, hq, hk, qw, kw, EPS, kc, vc, slots)
        results.append((q2, kc, vc))
    return results


# (Hq, Hk, D, qk-norm): the talker (GQA 16/8, 128, q/k norm), a small GQA 4/2 at 64, the codec
# decoder's MHA 16/16 at 64 without q/k norm.
GEOMETRIES = [(16, 8, 128, True), (4, 2, 64, True), (16, 16, 64, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk,d,norm", GEOMETRIES)
def test_qk_norm_rope_store_kv(hq, hk, d, norm, dtype, device):
    num_tokens, block_size, num_blocks = 6, 16, 5
    width = (hq + 2 * hk) * d
    # qkv rows sit in a wider buffer (row stride > width); the caches are the K and V halves of one
    # [num_blocks, 2, block_size, Hk, D] buffer, so neither is contiguous; unwritten slots stay NaN.
    qkv = randn(num_tokens, width + 32, dtype=dtype, device=device, scale=2.0)[:, :width]
    kv = torch.full((num_blocks, 2, block_size, hk, d), float("nan"), dtype=dtype, device=device)
    k_cache, v_cache = kv[:, 0], kv[:, 1]
    positions = torch.tensor([0, 5, 15, 16, 300, MAX_POS - 1], device=device)
    # Slot -1 is CUDA-graph padding: that token is rotated but not stored.
    slots = torch.tensor([3, -1, 17, 40, 79, 64], dtype=torch.int32, device=device)
    cache = rope_cos_sin_cache(MAX_POS, d, 1e6, device=device)
    qw = randn(d, dtype=dtype, device=device, seed=1) if norm else None
    kw = randn(d, dtype=dtype, device=device, seed=2) if norm else None
    (q_t, kc_t, vc_t), (q_r, kc_r, vc_r) = run_both(
        qkv, positions, cache, hq, hk, qw, kw, k_cache, v_cache, slots
    )
    assert_close(q_t, q_r)
    assert_close(kc_t, kc_r, equal_nan=True)
    assert_close(vc_t, vc_r, equal_nan=True)
    # The written slots hold values, the rest still hold the NaN they started with.
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[[3, 17, 40, 79, 64]] = True
    assert not kc_t.isnan().flatten(0, 1)[written].any()
    assert kc_t.isnan().flatten(0, 1)[~written].all()
    assert vc_t.isnan().flatten(0, 1)[~written].all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_without_cache(dtype, device):
    hq, hk, d = 4, 2, 128
    qkv = randn(3, (hq + 2 * hk) * d, dtype=dtype, device=device)
    positions = torch.tensor([7, 0, 1023], dtype=torch.int32, device=device)
    cache = rope_cos_sin_cache(1024, d, 1e4, device=device)
    (q_t, _, _), (q_r, _, _) = run_both(qkv, positions, cache, hq, hk, None, None, None, None, None)
    assert_close(q_t, q_r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic is wrong in the interpreter")
def test_bf16_on_gpu(device):
    hq, hk, d = 16, 8, 128
    qkv = randn(64, (hq + 2 * hk) * d, dtype=torch.bfloat16, device=device)
    positions = torch.arange(64, device=device)
    kc = torch.zeros(4, 16, hk, d, dtype=torch.bfloat16, device=device)
    slots = torch.arange(64, dtype=torch.int32, device=device)
    cache = rope_cos_sin_cache(MAX_POS, d, 1e6, device=device)
    qw, kw = (
        randn(d, dtype=torch.bfloat16, device=device),
        randn(d, dtype=torch.bfloat16, device=device, seed=1),
    )
    (q_t, kc_t, vc_t), (q_r, kc_r, vc_r) = run_both(
        qkv, positions, cache, hq, hk, qw, kw, kc, kc.clone(), slots
    )
    assert_close(q_t, q_r)
    assert_close(kc_t, kc_r)
    assert_close(vc_t, vc_r)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_talker_prefill(dtype, device):
    # A 128-token prompt at the talker geometry, written into 8 blocks in scrambled order.
    hq, hk, d, n = 16, 8, 128, 128
    qkv = randn(n, (hq + 2 * hk) * d, dtype=dtype, device=device)
    positions = torch.arange(n, device=device) + 40
    g = torch.Generator().manual_seed(3)
    slots = torch.randperm(16 * 16, generator=g)[:n].int().to(device)
    kc = torch.full((16, 16, hk, d), float("nan"), dtype=dtype, device=device)
    cache = rope_cos_sin_cache(MAX_POS, d, 1e6, device=device)
    qw, kw = randn(d, dtype=dtype, device=device), randn(d, dtype=dtype, device=device, seed=1)
    (q_t, kc_t, vc_t), (q_r, kc_r, vc_r) = run_both(
        qkv, positions, cache, hq, hk, qw, kw, kc, kc.clone(), slots
    )
    assert_close(q_t, q_r)
    assert_close(kc_t, kc_r, equal_nan=True)
    assert_close(vc_t, vc_r, equal_nan=True)
