"""A deliberately naive attention (one query at a time, explicit loops) to check the vectorised references."""

from __future__ import annotations

import torch


def naive_paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale):
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group, block_size = num_q_heads // num_kv_heads, k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for seq in range(len(context_lens)):
        start, end = int(cu_seqlens_q[seq]), int(cu_seqlens_q[seq + 1])
        ctx = int(context_lens[seq])
        for t in range(start, end):
            pos = ctx - (end - start) + (t - start)
            keys = [j for j in range(ctx) if j <= pos]
            if not keys:
                continue
            for h in range(num_q_heads):
                ks = torch.stack(
                    [k_cache[block_tables[seq, j // block_size], j % block_size, h // group] for j in keys]
                )
                vs = torch.stack(
                    [v_cache[block_tables[seq, j // block_size], j % block_size, h // group] for j in keys]
                )
                weights = torch.softmax(ks.float() @ q[t, h].float() * scale, dim=0)
                out[t, h] = weights @ vs.float()
    return out.to(q.dtype)
