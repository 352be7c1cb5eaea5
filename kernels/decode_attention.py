"""Paged-KV decode attention: one query token per sequence, split-K over the context, then a merge.

Layouts as in ``prefill_attention`` (``k_cache``/``v_cache`` ``[num_blocks, block_size, Hk, D]``,
``block_tables`` ``[B, max_blocks]`` int32, ``context_lens`` ``[B]`` int32 including the new token,
whose k and v are already in the cache), with ``q`` ``[B, Hq, D]``. A sequence with
``context_len = 0`` (CUDA-graph padding) gets zeros.

Math, for the new token at position i = context_len - 1 and query head h over KV head g:

    out[b, h] = sum_j softmax_j(scale * q[b, h] . k[j, g]) v[j, g]   over j <= i.

Split-K (flash-decoding): the context is cut into ``num_splits`` chunks of whole BLOCK_N tiles, a count
``decode_num_splits`` picks from the batch and the block table's width.
Each chunk s yields a normalised partial output o_s and a log-sum-exp L_s (base 2); the merge is

    out = sum_s 2^(L_s - L) o_s,   L = log2(sum_s 2^L_s).

The grid always has ``num_splits`` programs per (sequence, KV head) and each computes its own chunk from
the sequence's length on the device, so one launch shape serves any lengths (CUDA-graph safe); chunks
past the end write an empty partial (L = -inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_triton_device, dot_precision, dot_upcast, eager_reference_on_cpu, next_power_of_2, num_sms
from .prefill_attention import LOG2E, check_paged_args, paged_prefill_attention_reference

MAX_SPLITS = 16
MIN_TOKENS_PER_SPLIT = 256


def decode_num_splits(batch: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice over, but no split shorter than MIN_TOKENS_PER_SPLIT."""
    programs = max(batch * num_kv_heads, 1)
    wanted = triton.cdiv(2 * num_sms(device), programs)
    useful = triton.cdiv(max(max_context_len, 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2e,
    stride_q_seq, stride_q_head,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head,
    stride_bt_seq, stride_o_seq, stride_o_head,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid (B, Hk, NUM_SPLITS). The GROUP query heads of one KV head share the program, padded to
    BLOCK_H >= 16 rows so both products are tensor-core dots; each K/V tile is read once per group."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    # Whole tiles per split so only a chunk's last tile is partial.
    per_split = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context_len)

    rows = tl.arange(0, BLOCK_H)
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq * stride_bt_seq
    for tile_start in range(start, end, BLOCK_N):
        kv_pos = tile_start + tl.arange(0, BLOCK_N)
        kv_mask = kv_pos < end
        page = tl.load(block_table + kv_pos // PAGE_SIZE, mask=kv_mask, other=0).to(tl.int64)
        in_page = kv_pos % PAGE_SIZE
        kv_load_mask = kv_mask[:, None] & dim_mask[None, :]
        k_offsets = (
            page[:, None] * stride_k_block + in_page[:, None] * stride_k_token + kv_head * stride_k_head
        )
        k = tl.load(k_cache_ptr + k_offsets + dims[None, :], mask=kv_load_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
        scores = tl.where(kv_mask[None, :], scores, float("-inf"))
        # Every tile holds at least one visible key, so m_new is finite from the first tile on.
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v_offsets = (
            page[:, None] * stride_v_block + in_page[:, None] * stride_v_token + kv_head * stride_v_head
        )
        v = tl.load(v_cache_ptr + v_offsets + dims[None, :], mask=kv_load_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + seq * stride_o_seq + heads[:, None] * stride_o_head + dims[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials are [B, Hq, NUM_SPLITS, HEAD_DIM] fp32 and the LSEs [B, Hq, NUM_SPLITS].
        part = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=out_mask)
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_mask)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_o_seq, stride_o_head,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid (B, Hq): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(L_s - max L); zeros if all splits are empty."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < NUM_SPLITS
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    lse = tl.load(part_lse_ptr + part + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    parts = tl.load(part_out_ptr + (part + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_mask[:, None] & dim_mask[None, :], other=0.0)  # fmt: skip
    total = tl.sum(weights, axis=0)
    out = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_seq + head * stride_o_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_mask)  # fmt: skip


def paged_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    block_n: int = 64,
) -> torch.Tensor:
    """Triton launcher; see the module docstring. Returns a new ``[B, Hq, D]`` tensor.

    The split count comes from the batch and the block table's width (the longest context it can
    address), never from ``context_lens``, so choosing it needs no device sync and a captured graph
    stays valid for any lengths the table holds. ``block_n`` keys per tile is a tuning knob.
    """
    check_paged_args(q, k_cache, v_cache, block_tables, context_lens)
    check_triton_device(q, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    assert block_tables.shape[0] == num_seqs, "one block-table row per query"
    assert block_n >= 16, "tl.dot needs 16 keys per tile for 16-bit inputs"
    group = num_q_heads // num_kv_heads
    out = torch.empty((num_seqs, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    num_splits = decode_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * page_size, q.device)
    if num_splits > 1:
        part_out = torch.empty(
            (num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused: the NUM_SPLITS == 1 branch writes ``out`` directly
    block_d = next_power_of_2(head_dim)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE_SIZE=page_size, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=dot_upcast(q.dtype), num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _decode_merge_kernel[(num_seqs, num_q_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    return out


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """PyTorch version: the prefill reference with one query per sequence."""
    cu_seqlens_q = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


@torch.library.custom_op("makima::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV; ``[B, Hq, D]`` in ``q.dtype``."""
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)


paged_decode_attention_op.register_kernel("cuda")(paged_decode_attention_triton)


@paged_decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale):
    return q.new_empty(q.shape)


paged_decode_attention = eager_reference_on_cpu(paged_decode_attention_op, paged_decode_attention_reference)
