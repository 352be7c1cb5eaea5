"""Shared builders for the kernel tests: tolerances, paged KV caches with scrambled block tables."""

from __future__ import annotations

import torch

# atol = rtol per dtype. fp32 dots run in IEEE precision, so fp32 stays tight; fp16 allows a couple
# of output ulps (softmax weights are rounded to fp16 before the P.V product). bf16 only runs on a GPU.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, equal_nan: bool = False) -> None:
    """Same dtype, same shape, within the dtype's tolerance; NaN fails unless ``equal_nan``."""
    tol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, equal_nan=equal_nan)


def make_paged_kv(
    context_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int = 16,
    spare_blocks: int = 3,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches ``[num_blocks, block_size, Hk, D]`` holding each sequence in shuffled blocks.

    Every slot no sequence owns (the tail of a last block, the spare blocks) is NaN, and block-table
    entries past a sequence's end point far outside the cache: reading either shows up as a NaN or a
    crash instead of a silently plausible number.
    """
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_seq, default=0) + 2
    block_tables = torch.full((len(context_lens), width), num_blocks + 10**6, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    used = 0
    for seq, (n, nb) in enumerate(zip(context_lens, blocks_per_seq, strict=True)):
        pages = order[used : used + nb]
        used += nb
        block_tables[seq, :nb] = pages.int()
        flat = torch.arange(n)
        k_cache[pages[flat // block_size], flat % block_size] = torch.randn(
            n, num_kv_heads, head_dim, generator=g
        )
        v_cache[pages[flat // block_size], flat % block_size] = torch.randn(
            n, num_kv_heads, head_dim, generator=g
        )
    context = torch.tensor(context_lens, dtype=torch.int32)
    return (
        k_cache.to(dtype).to(device),
        v_cache.to(dtype).to(device),
        block_tables.to(device),
        context.to(device),
    )


def randn(
    *shape: int, dtype: torch.dtype, device: torch.device, seed: int = 0, scale: float = 1.0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)
