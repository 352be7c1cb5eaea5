"""The talker's attention context in the serving engine: K/V in a pool of paged blocks.

One ``PagedKVCache`` per engine holds ``[num_blocks, block_size, Hk, D]`` for K and V per layer.
Each step the runner builds a ``PagedContext`` describing the batch in vLLM's words: for every
token its ``positions`` and ``slot_mapping``; for every sequence its ``block_tables`` row, its
``context_lens`` (cached + new) and, for prefill/extend batches, ``cu_seqlens_q``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import TransformerConfig
from engine.models.qwen3 import Attention
from kernels import paged_decode_attention, paged_prefill_attention, qk_norm_rope_store_kv


class PagedKVCache:
    def __init__(self, cfg: TransformerConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(cfg: TransformerConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


@dataclass
class PagedContext:
    cache: PagedKVCache
    cos_sin: torch.Tensor  # [max_position, D] fp32
    eps: float
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, cached + new tokens
    cu_seqlens_q: torch.Tensor | None  # [B + 1] int32; None: one new token per sequence (decode)

    @property
    def num_sequences(self) -> int:
        return self.context_lens.shape[0]

    def attend(self, layer: int, qkv: torch.Tensor, attn: Attention) -> torch.Tensor:
        hq, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        qk_norm_rope_store_kv(qkv, self.positions, self.cos_sin, hq, hk, attn.q_norm.weight, attn.k_norm.weight,
                              self.eps, k_cache, v_cache, self.slot_mapping)
        q = qkv.view(qkv.shape[0], hq + 2 * hk, d)[:, :hq]
        scale = d ** -0.5
        if self.cu_seqlens_q is None:
            out = paged_decode_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, scale)
        else:
            out = paged_prefill_attention(q, k_cache, v_cache, self.block_tables, self.cu_seqlens_q,
                                          self.context_lens, scale)
        return out.reshape(qkv.shape[0], hq * d)
