"""The Qwen3 decoder block shared by the talker (28 layers) and the code predictor (5 layers).

Pre-norm block: RMSNorm → GQA attention with per-head q/k RMSNorm applied *before* rotary
embedding → residual; RMSNorm → SwiGLU MLP → residual; a final RMSNorm on the stack. No biases.
Rotary embedding is plain 1-D rotate-half RoPE over the whole head: the talker's interleaved
M-RoPE reduces to it exactly because its three position streams are always equal (spec §1.1).

Activations are token-major, ``[T, hidden]`` with the tokens of every sequence in the batch
stacked. Where K/V live and how attention reads them is the job of an *attention context*
passed to ``forward``: ``ContiguousContext`` here (a dense per-sequence cache, for the code
predictor and the single-request path) or the engine's paged context. Both call the same ops
from ``kernels`` (Triton on CUDA, PyTorch references elsewhere).

After loading, ``fuse_weights_`` packs q/k/v and gate/up into one matrix each (the original
parameters become views into it, so the state dict is unchanged): one GEMM instead of three,
which at batch 1 is one pass over the weights instead of three launches. On CPU the wide
projection matrices are also stored input-major (see ``pack_linears``). How each projection
multiplies (fp32, bf16 or int8 weights) is engine/models/cpu_linear.py's business.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TransformerConfig
from engine.models.cpu_linear import AnyProjection, make_projection
from kernels import fused_add_rms_norm, qk_norm_rope_store_kv, rms_norm, rope_cos_sin_cache, silu_and_mul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class AttentionContext(Protocol):
    """Where this forward's K/V go and which K/V each new token attends to."""

    def attend(self, layer: int, qkv: torch.Tensor, attn: Attention) -> torch.Tensor:
        """qkv: [T, (Hq + 2 Hk) D] fresh projections → attention output [T, Hq D]."""
        ...

    @property
    def num_sequences(self) -> int:
        """Sequences in this forward (the projections batch their weights differently for several)."""
        ...


class RopeTable:
    """The fp32 ``[cos | sin]`` table of a stack, grown on demand, per device."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.head_dim, self.theta = head_dim, theta
        self.table: torch.Tensor | None = None

    def get(self, min_positions: int, device: torch.device) -> torch.Tensor:
        t = self.table
        if t is None or t.shape[0] < min_positions or t.device != device:
            size = max(min_positions, 256 if t is None else 2 * t.shape[0])
            self.table = rope_cos_sin_cache(size, self.head_dim, self.theta, device)
        return self.table


class ContiguousContext:
    """A dense cache ``[B, Hk, capacity, D]`` per layer for ``B`` sequences that advance in lockstep
    (same number of new tokens each call): the code predictor's 16-position cache, or one request."""

    def __init__(self, cfg: TransformerConfig, rope: RopeTable, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.batch, self.capacity, self.length = batch, capacity, 0
        self.cos_sin = rope.get(capacity, device)
        self.eps = cfg.rms_norm_eps
        self._new = 0
        self._positions = torch.empty(0, dtype=torch.long, device=device)

    @property
    def num_sequences(self) -> int:
        return self.batch

    def run(self, stack: Qwen3Stack, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, hidden] continuing every sequence by S tokens → normed hidden [B, S, hidden]."""
        b, s, _ = x.shape
        if b != self.batch:
            raise ValueError(f"context holds {self.batch} sequences, got {b}")
        if self.length + s > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.length + s} > capacity {self.capacity}")
        self._new = s
        self._positions = torch.arange(self.length, self.length + s, device=x.device).repeat(b)
        out = stack(x.reshape(b * s, -1), self)
        self.length += s
        return out.view(b, s, -1)

    def attend(self, layer: int, qkv: torch.Tensor, attn: Attention) -> torch.Tensor:
        hq, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        qk_norm_rope_store_kv(qkv, self._positions, self.cos_sin, hq, hk, attn.q_norm.weight, attn.k_norm.weight,
                              self.eps, None, None, None)
        b, s = self.batch, self._new
        heads = qkv.view(b, s, hq + 2 * hk, d).transpose(1, 2)  # [B, heads, S, D]
        start, end = self.length, self.length + s
        self.k[layer][:, :, start:end] = heads[:, hq:hq + hk]
        self.v[layer][:, :, start:end] = heads[:, hq + hk:]
        k_all, v_all = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        # New tokens sit at the end of the cache: a causal mask aligned to the bottom-right.
        mask = None if s == 1 else torch.ones(s, end, dtype=torch.bool, device=qkv.device).tril(diagonal=end - s)
        out = F.scaled_dot_product_attention(heads[:, :hq], k_all, v_all, attn_mask=mask, enable_gqa=hq != hk)
        return out.transpose(1, 2).reshape(b * s, hq * d)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qkv: AnyProjection | None = None  # set by fuse_weights_
        self.o: AnyProjection | None = None

    def forward(self, x: torch.Tensor, ctx: AttentionContext, layer: int) -> torch.Tensor:
        many = ctx.num_sequences > 1
        return self.o(ctx.attend(layer, self.qkv(x, many), self), many)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up: AnyProjection | None = None  # set by fuse_weights_
        self.down: AnyProjection | None = None

    def forward(self, x: torch.Tensor, many_sequences: bool) -> torch.Tensor:
        return self.down(silu_and_mul(self.gate_up(x, many_sequences)), many_sequences)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.eps = cfg.rms_norm_eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: AttentionContext,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the previous layer's MLP output and residual; returns this layer's. The residual add
        is fused into the next norm (same sum, same rounding as an unfused block)."""
        if residual is None:
            residual, h = x, rms_norm(x, self.input_layernorm.weight, self.eps)
        else:
            h, residual = fused_add_rms_norm(x, residual, self.input_layernorm.weight, self.eps)
        h = self.self_attn(h, ctx, layer)
        h, residual = fused_add_rms_norm(h, residual, self.post_attention_layernorm.weight, self.eps)
        return self.mlp(h, ctx.num_sequences > 1), residual


def pack_linears(linears: list[nn.Linear]) -> torch.Tensor:
    """Concatenate weights row-wise and make each Linear's weight a view into the packed matrix.

    On CPU a matrix with more outputs than inputs is stored input-major ([in, out] in memory, the
    same [out, in] view): ``F.linear`` then runs as ``x @ W_t``, which MKL streams at 20-21 GB/s for
    one row against 15-16 GB/s for the [out, in] GEMV (this AMD EPYC, one thread, fp32, 4096-6144 x
    1024). Narrow matrices (o_proj, down_proj) are faster as they are (17-19 against 15.5 GB/s).
    Batch-1 CPU frames are weight-bandwidth bound, so this is most of a frame."""
    packed = torch.cat([lin.weight.data for lin in linears])
    if packed.device.type == "cpu" and packed.shape[0] > packed.shape[1]:
        packed = packed.t().contiguous().t()
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(packed[row:row + rows], requires_grad=False)
        row += rows
    return packed


class Qwen3Stack(nn.Module):
    """``layers`` + final ``norm``; the caller owns the embeddings and heads."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope = RopeTable(cfg.head_dim, cfg.rope_theta)

    @torch.no_grad()
    def fuse_weights_(self, weights: str = "fp32") -> None:
        """Pack the projections, in weight format ``weights`` (see engine/models/cpu_linear.py)."""
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv = make_projection(pack_linears([a.q_proj, a.k_proj, a.v_proj]), weights)
            a.o = make_projection(a.o_proj.weight, weights)
            m.gate_up = make_projection(pack_linears([m.gate_proj, m.up_proj]), weights)
            m.down = make_projection(m.down_proj.weight, weights)

    def contiguous_context(self, batch: int, capacity: int) -> ContiguousContext:
        p = self.norm.weight
        return ContiguousContext(self.cfg, self.rope, batch, capacity, p.dtype, p.device)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x: [T, hidden] new tokens of every sequence → normed hidden states [T, hidden]."""
        if self.layers[0].self_attn.qkv is None:
            raise RuntimeError("call fuse_weights_() after loading the weights")
        h, residual = x, None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, ctx, i)
        out, _ = fused_add_rms_norm(h, residual, self.norm.weight, self.cfg.rms_norm_eps)
        return out
