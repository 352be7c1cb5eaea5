"""Paged-KV attention for prefill / extend: several new tokens per sequence, varlen, causal.

Layouts (the vLLM / nano-vllm ones):

- ``q``: ``[T, Hq, D]``, the new tokens of all sequences back to back; ``cu_seqlens_q`` ``[B + 1]`` int32
  holds where each sequence starts (``cu_seqlens_q[0] = 0``, ``cu_seqlens_q[B] = T``). Any strides
  with a contiguous last dimension, so a view into a fused QKV output works.
- ``k_cache``, ``v_cache``: ``[num_blocks, block_size, Hk, D]``, ``Hq % Hk == 0`` (GQA).
- ``block_tables``: ``[B, max_blocks]`` int32; token j of sequence b lives in page
  ``block_tables[b, j // block_size]`` at offset ``j % block_size``. Entries past a sequence's length
  are never read.
- ``context_lens``: ``[B]`` int32, the sequence length *including* the new tokens, whose k and v must
  already be in the cache (written by ``qk_norm_rope_store_kv``). So the cached prefix of sequence b
  has ``context_lens[b] - q_len[b]`` tokens and its new token i sits at position ``prefix + i``.

Math, for the query at position i of a sequence and its KV head g = h // (Hq / Hk):

    out[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, g]) v[j, g]   over visible j,

where j is visible iff ``j <= i`` (its cached prefix and itself, causally). Softmax in fp32, output in
``q.dtype``.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from ._common import (
    FLOAT_DTYPES,
    check_triton_device,
    dot_precision,
    dot_upcast,
    eager_reference_on_cpu,
    next_power_of_2,
)

LOG2E = 1.4426950408889634

# Scratch for the reference's KV gather, reused across calls: a fresh multi-megabyte tensor per call
# costs more in first-touch page faults than the copy itself on a CPU (8x at 64 MiB). Per thread, so
# concurrent callers never share one.
_gather_scratch = threading.local()


def _scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    key = (name, like.dtype, like.device)
    buffers = _gather_scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buf = buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


@triton.jit
def _find_sequence(cu_seqlens_q_ptr, program, num_seqs, BLOCK_Q: tl.constexpr):
    """Binary search for the sequence owning ``program``: sequence b's programs start at cu[b] // BLOCK_Q + b.

    That start index grows with b and leaves each sequence room for ceil(q_len / BLOCK_Q) programs,
    so a grid of cdiv(T, BLOCK_Q) + B covers any batch without reading lengths on the host.
    """
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= program:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_q_ptr, context_lens_ptr, out_ptr,
    scale_log2e, num_seqs,
    stride_q_token, stride_q_head,
    stride_k_block, stride_k_token, stride_k_head,
    stride_v_block, stride_v_token, stride_v_head,
    stride_bt_seq, stride_o_token, stride_o_head,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(T, BLOCK_Q) + B, Hk). A program owns BLOCK_Q tokens x the GROUP query heads of one KV
    head, packed as BLOCK_M rows (row r = token r // GROUP, head r % GROUP), so every KV tile it loads
    serves all heads of the group. Online softmax in base 2 over KV tiles of BLOCK_N tokens."""
    kv_head = tl.program_id(1)
    seq = _find_sequence(cu_seqlens_q_ptr, tl.program_id(0), num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_block = tl.program_id(0) - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len

    rows = tl.arange(0, BLOCK_M)
    token_in_seq = q_block * BLOCK_Q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < BLOCK_Q * GROUP) & (token_in_seq < q_len)
    query_pos = prefix_len + token_in_seq
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_offsets = (q_start + token_in_seq).to(tl.int64)[:, None] * stride_q_token + heads[
        :, None
    ] * stride_q_head
    q = tl.load(q_ptr + q_offsets + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys this block can see: from the first up to its last query's position.
    kv_end = tl.minimum(prefix_len + (q_block + 1) * BLOCK_Q, context_len)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for tile_start in range(0, kv_end, BLOCK_N):
        kv_pos = tile_start + tl.arange(0, BLOCK_N)
        kv_mask = kv_pos < kv_end
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
        visible = kv_mask[None, :] & (kv_pos[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        # Should a row see no key (context_lens below the new tokens' count): no (-inf) - (-inf) in exp2.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        v_offsets = (
            page[:, None] * stride_v_block + in_page[:, None] * stride_v_token + kv_head * stride_v_head
        )
        v = tl.load(v_cache_ptr + v_offsets + dims[None, :], mask=kv_load_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_offsets = (q_start + token_in_seq).to(tl.int64)[:, None] * stride_o_token + heads[
        :, None
    ] * stride_o_head
    tl.store(out_ptr + o_offsets + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])  # fmt: skip


def check_paged_args(q, k_cache, v_cache, block_tables, context_lens) -> None:
    """Shape/stride/dtype asserts shared by the prefill and decode launchers (q is [tokens, Hq, D])."""
    assert q.dim() == 3 and q.dtype in FLOAT_DTYPES and q.stride(-1) == 1, (
        "q must be [tokens, Hq, D], dense in D"
    )
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (
        "caches must be [num_blocks, block_size, Hk, D]"
    )
    assert k_cache.dtype == v_cache.dtype == q.dtype, "q and the caches share one dtype"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    num_q_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], k_cache.shape[2]
    assert k_cache.shape[3] == head_dim, f"head_dim {head_dim} != cache head_dim {k_cache.shape[3]}"
    assert num_q_heads % num_kv_heads == 0, f"{num_q_heads} query heads over {num_kv_heads} KV heads"
    assert block_tables.dim() == 2 and block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert context_lens.shape == (block_tables.shape[0],) and context_lens.dtype == torch.int32


def paged_prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    block_m: int = 64,
    block_n: int = 32,
) -> torch.Tensor:
    """Triton launcher; see the module docstring. Returns a new ``[T, Hq, D]`` tensor.

    ``block_m`` rows (tokens x group heads) per program and ``block_n`` keys per tile are tuning knobs.
    """
    check_paged_args(q, k_cache, v_cache, block_tables, context_lens)
    assert cu_seqlens_q.shape == (block_tables.shape[0] + 1,) and cu_seqlens_q.dtype == torch.int32
    check_triton_device(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, num_kv_heads = block_tables.shape[0], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m = max(block_m, next_power_of_2(group))
    assert block_m >= 16 and block_n >= 16, "tl.dot needs 16 rows and 16 keys per tile for 16-bit inputs"
    block_q = block_m // group
    grid = (triton.cdiv(num_tokens, block_q) + num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q,
        HEAD_DIM=head_dim, BLOCK_D=next_power_of_2(head_dim), PAGE_SIZE=k_cache.shape[1], BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=dot_upcast(q.dtype), num_warps=4, num_stages=2,
    )  # fmt: skip
    return out


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """PyTorch version: gather each sequence's KV, pad the batch, one masked SDPA call in fp32.

    Reads sequence lengths on the host, so it is meant for CPU tensors (the engine's CPU path and tests).
    """
    check_paged_args(q, k_cache, v_cache, block_tables, context_lens)
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs, block_size = block_tables.shape[0], k_cache.shape[1]
    out = torch.zeros((num_tokens, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    ctx = context_lens.long()
    max_q, max_ctx = int(q_lens.max()), max(int(ctx.max()), 1)

    # KV, gathered whole pages at a time (a few large copies, not one per token) and padded to
    # [B, Hk, max_ctx, D]. Block-table entries past a sequence's end may be garbage ids, and slots past
    # its end garbage values (even NaN, which a zero attention weight would not cancel): zero them.
    num_pages = -(-max_ctx // block_size)
    page_start = torch.arange(num_pages, device=q.device) * block_size
    pages = block_tables[:, :num_pages].long().where(page_start[None, :] < ctx[:, None], 0).flatten()
    kv_pos = torch.arange(max_ctx, device=q.device)
    in_range = kv_pos[None, :] < ctx[:, None]
    # Index lists, not a boolean mask: a mask assignment is a pass over the whole gathered cache.
    outside = (~in_range).nonzero(as_tuple=True)

    def gather(cache: torch.Tensor, name: str) -> torch.Tensor:
        paged = _scratch(name, (pages.numel(), *cache.shape[1:]), cache)
        torch.index_select(cache, 0, pages, out=paged)
        paged = paged.view(num_seqs, num_pages * block_size, *cache.shape[2:])[:, :max_ctx].float()
        paged[outside] = 0.0
        return paged.transpose(1, 2)

    k, v = gather(k_cache, "k"), gather(v_cache, "v")

    # Queries padded to [B, Hq, max_q, D]; padded rows are clamped to a real token and dropped at the end.
    q_idx = torch.arange(max_q, device=q.device)
    q_valid = q_idx[None, :] < q_lens[:, None]
    tokens = (cu_seqlens_q[:-1].long()[:, None] + q_idx[None, :]).clamp(max=num_tokens - 1)
    qp = q[tokens].float().transpose(1, 2)

    gqa = num_q_heads != k.shape[1]
    if bool((q_lens == ctx).all()) and bool((q_lens == max_q).all()):
        # Fresh prompts of one length, no prefix: plain causal attention, which SDPA can do without
        # materialising a mask and skipping the masked half (about 2x faster on a CPU).
        o = torch.nn.functional.scaled_dot_product_attention(
            qp, k, v, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        query_pos = (ctx - q_lens)[:, None] + q_idx[None, :]
        visible = (kv_pos[None, None, :] <= query_pos[:, :, None]) & in_range[:, None, :]
        o = torch.nn.functional.scaled_dot_product_attention(
            qp, k, v, attn_mask=visible[:, None], scale=scale, enable_gqa=gqa
        )
        # Rows that see no key are zero by definition (SDPA backends disagree on them).
        o = o.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)
    out[:] = o.transpose(1, 2)[q_valid].to(q.dtype)
    return out


@torch.library.custom_op("makima::paged_prefill_attention", mutates_args=())
def paged_prefill_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal varlen attention of new tokens over their paged KV (prefix + themselves); ``[T, Hq, D]``."""
    return paged_prefill_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale)


paged_prefill_attention_op.register_kernel("cuda")(paged_prefill_attention_triton)


@paged_prefill_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    return q.new_empty(q.shape)


paged_prefill_attention = eager_reference_on_cpu(paged_prefill_attention_op, paged_prefill_attention_reference)
