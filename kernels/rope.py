"""Per-head q/k RMSNorm + rotary embedding, in place on a fused QKV output, plus the paged KV write.

Layouts:

- ``qkv``: ``[T, (Hq + 2 * Hk) * D]``, one row per token, heads in the order q heads, k heads, v heads
  (the output of one fused QKV projection). Columns must be contiguous; the row stride is free.
- ``cos_sin_cache``: ``[max_position, D]`` fp32, ``cos(p * f_i)`` in columns ``[0, D/2)`` and
  ``sin(p * f_i)`` in ``[D/2, D)``, with ``f_i = theta ** (-2i / D)``; build it with
  :func:`rope_cos_sin_cache`.
- ``k_cache``, ``v_cache``: ``[num_blocks, block_size, Hk, D]``; ``slot_mapping[t] = block * block_size
  + offset`` says where token t's k and v go; ``-1`` skips the token (CUDA-graph padding).

Math, per token t at position p and head h, on x = the head's D values in fp32:

    x   <- round(w * round(x * rsqrt(mean(x^2) + eps)))        (only when norm weights are given)
    x1, x2 = x[:D/2], x[D/2:]                                   (rotate-half / NeoX pairing)
    out = round([x1 cos - x2 sin, x2 cos + x1 sin])             (cos, sin from row p of the cache)

``round`` casts to the qkv dtype. The norm matches HF Qwen3's q_norm/k_norm bit for bit; the rotation is
done in fp32 and rounded once, where HF rounds cos/sin and each product to the activation dtype (a
difference of a few 16-bit ulps). The cache receives the rotated k and the untouched v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_triton_device, eager_reference_on_cpu, next_power_of_2
from .norm import rms_norm_reference


def rope_cos_sin_cache(
    max_position: int, head_dim: int, theta: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[max_position, head_dim]`` fp32 table ``[cos | sin]`` computed in fp32 the way HF does."""
    assert head_dim % 2 == 0
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


@triton.jit
def _norm_rope_heads(
    head_ptr, weight_ptr, cos, sin, eps,
    NUM_HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):  # fmt: skip
    """Norm + rotate ``NUM_HEADS`` consecutive heads at ``head_ptr`` in place; returns the halves (fp32)."""
    heads = tl.arange(0, BLOCK_HEADS)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < NUM_HEADS) & (cols[None, :] < HALF)
    ptrs = head_ptr + heads[:, None] * (2 * HALF) + cols[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = head_ptr.dtype.element_ty
    if HAS_NORM:
        mean_square = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
        rstd = tl.math.rsqrt(mean_square + eps)[:, None]
        w1 = tl.load(weight_ptr + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(weight_ptr + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
        # Two roundings, as in HF: the normalised value, then its product with the weight.
        x1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin
    tl.store(ptrs, out1.to(dtype), mask=mask)
    tl.store(ptrs + HALF, out2.to(dtype), mask=mask)
    return out1, out2


@triton.jit
def _qk_norm_rope_store_kv_kernel(
    qkv_ptr, positions_ptr, cos_sin_ptr, q_weight_ptr, k_weight_ptr,
    k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_qkv, stride_cos_sin,
    stride_kc_block, stride_kc_token, stride_kc_head,
    stride_vc_block, stride_vc_token, stride_vc_head,
    block_size, eps,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_CACHE: tl.constexpr,
):  # fmt: skip
    """One program per token: all its q heads, then all its k heads, then the k/v cache write."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + position * stride_cos_sin + cols, mask=cols < HALF, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + position * stride_cos_sin + HALF + cols, mask=cols < HALF, other=0.0)[None, :]
    row_ptr = qkv_ptr + token * stride_qkv
    _norm_rope_heads(
        row_ptr, q_weight_ptr, cos, sin, eps, NUM_Q_HEADS, BLOCK_Q_HEADS, HALF, BLOCK_HALF, HAS_NORM
    )
    k_ptr = row_ptr + NUM_Q_HEADS * 2 * HALF
    k1, k2 = _norm_rope_heads(
        k_ptr, k_weight_ptr, cos, sin, eps, NUM_KV_HEADS, BLOCK_KV_HEADS, HALF, BLOCK_HALF, HAS_NORM
    )
    if HAS_CACHE:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:
            block = slot // block_size
            offset = slot % block_size
            heads = tl.arange(0, BLOCK_KV_HEADS)
            mask = (heads[:, None] < NUM_KV_HEADS) & (cols[None, :] < HALF)
            k_dst = k_cache_ptr + block * stride_kc_block + offset * stride_kc_token
            k_dst += heads[:, None] * stride_kc_head + cols[None, :]
            tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            v_src = k_ptr + NUM_KV_HEADS * 2 * HALF + heads[:, None] * (2 * HALF) + cols[None, :]
            v_dst = v_cache_ptr + block * stride_vc_block + offset * stride_vc_token
            v_dst += heads[:, None] * stride_vc_head + cols[None, :]
            tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)
            tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=mask), mask=mask)


def _check(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_norm_weight, k_norm_weight,
           k_cache, v_cache, slot_mapping) -> int:  # fmt: skip
    """Validates the layouts documented at the top of the file; returns head_dim."""
    head_dim = cos_sin_cache.shape[-1]
    assert qkv.dtype in FLOAT_DTYPES, f"unsupported dtype {qkv.dtype}"
    assert qkv.dim() == 2 and qkv.shape[1] == (num_q_heads + 2 * num_kv_heads) * head_dim, (
        f"qkv {tuple(qkv.shape)} is not [T, (Hq + 2 Hk) D], Hq={num_q_heads} Hk={num_kv_heads} D={head_dim}"
    )
    assert qkv.stride(1) == 1, "qkv columns must be contiguous"
    assert head_dim % 2 == 0 and cos_sin_cache.dim() == 2 and cos_sin_cache.stride(1) == 1
    assert cos_sin_cache.dtype == torch.float32, "the cos/sin cache is fp32"
    assert positions.shape == (qkv.shape[0],) and not positions.is_floating_point()
    assert (q_norm_weight is None) == (k_norm_weight is None), "give both q and k norm weights or neither"
    for w in (q_norm_weight, k_norm_weight):
        assert w is None or (w.shape == (head_dim,) and w.is_contiguous())
    assert (k_cache is None) == (v_cache is None) == (slot_mapping is None), "cache args go together"
    if k_cache is not None:
        for cache in (k_cache, v_cache):
            assert cache.dim() == 4 and cache.shape[2:] == (num_kv_heads, head_dim), (
                f"cache {tuple(cache.shape)} is not [num_blocks, block_size, {num_kv_heads}, {head_dim}]"
            )
            assert cache.stride(3) == 1 and cache.dtype == qkv.dtype
        assert k_cache.shape == v_cache.shape
        assert slot_mapping.shape == (qkv.shape[0],) and not slot_mapping.is_floating_point()
    return head_dim


def qk_norm_rope_store_kv_triton(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> None:
    """Triton launcher; see the module docstring. Mutates ``qkv`` (q and k parts) and the caches."""
    head_dim = _check(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_norm_weight,
                      k_norm_weight, k_cache, v_cache, slot_mapping)  # fmt: skip
    check_triton_device(qkv)
    if qkv.shape[0] == 0:
        return
    has_norm, has_cache = q_norm_weight is not None, k_cache is not None
    # Unused pointer arguments get any valid tensor; their constexpr branch is compiled away.
    q_w, k_w = (q_norm_weight, k_norm_weight) if has_norm else (cos_sin_cache, cos_sin_cache)
    k_c, v_c, slots = (k_cache, v_cache, slot_mapping) if has_cache else (qkv, qkv, positions)
    kc_strides = k_c.stride()[:3] if has_cache else (0, 0, 0)
    vc_strides = v_c.stride()[:3] if has_cache else (0, 0, 0)
    _qk_norm_rope_store_kv_kernel[(qkv.shape[0],)](
        qkv, positions, cos_sin_cache, q_w, k_w, k_c, v_c, slots,
        qkv.stride(0), cos_sin_cache.stride(0), *kc_strides, *vc_strides,
        k_cache.shape[1] if has_cache else 1, eps,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
        BLOCK_Q_HEADS=next_power_of_2(num_q_heads), BLOCK_KV_HEADS=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(head_dim // 2),
        HAS_NORM=has_norm, HAS_CACHE=has_cache,
        num_warps=4,
    )  # fmt: skip


def qk_norm_rope_store_kv_reference(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> None:
    """PyTorch version of the same in-place update, vectorised over tokens and heads.

    q and k heads are normed and rotated in one pass (a per-head weight row each): the same math per
    element as two passes, with half the small ops, which is what a batch-1 CPU step pays for."""
    head_dim = _check(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_norm_weight,
                      k_norm_weight, k_cache, v_cache, slot_mapping)  # fmt: skip
    heads = qkv.unflatten(1, (num_q_heads + 2 * num_kv_heads, head_dim))
    qk = heads[:, : num_q_heads + num_kv_heads]
    v = heads[:, num_q_heads + num_kv_heads :]
    x = qk
    if q_norm_weight is not None:
        weight = torch.cat((q_norm_weight.expand(num_q_heads, head_dim),
                            k_norm_weight.expand(num_kv_heads, head_dim)))  # fmt: skip
        x = rms_norm_reference(qk, weight, eps)  # broadcasts one weight row per head
    x = x.float()
    cos, sin = cos_sin_cache[positions.long()].unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    qk.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    k = heads[:, num_q_heads : num_q_heads + num_kv_heads]
    if k_cache is not None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        block_size = k_cache.shape[1]
        # Advanced-index assignment writes through any cache strides (a view into a bigger buffer).
        k_cache[slots // block_size, slots % block_size] = k[keep]
        v_cache[slots // block_size, slots % block_size] = v[keep]


@torch.library.custom_op("makima::qk_norm_rope_store_kv", mutates_args=("qkv", "k_cache", "v_cache"))
def qk_norm_rope_store_kv_op(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> None:
    """In place: optional per-head RMSNorm of q and k, NeoX RoPE on both, k and v into the paged cache."""
    qk_norm_rope_store_kv_reference(
        qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads,
        q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping,
    )  # fmt: skip


qk_norm_rope_store_kv_op.register_kernel("cuda")(qk_norm_rope_store_kv_triton)


@qk_norm_rope_store_kv_op.register_fake
def _(qkv, positions, cos_sin_cache, num_q_heads, num_kv_heads, q_norm_weight, k_norm_weight, eps,
      k_cache, v_cache, slot_mapping):  # fmt: skip
    return None


qk_norm_rope_store_kv = eager_reference_on_cpu(qk_norm_rope_store_kv_op, qk_norm_rope_store_kv_reference)
