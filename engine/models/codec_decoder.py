"""12 Hz codec decoder: 16 codes per frame → 1920 samples at 24 kHz (spec §5.3).

    codes [B, 16, T]
      → RVQ dequantize: level 0 (rvq_first) and levels 1..15 (rvq_rest) each summed, each
        group through its own k1 output projection, the two added          [B, codebook_dim, T]
      → pre_conv: causal conv k3                                            [B, latent, T]
      → pre_transformer: Linear in, 8 × (RMSNorm, windowed causal attention with RoPE,
        LayerScale; RMSNorm, SwiGLU, LayerScale), RMSNorm, Linear out
      → upsample ×4: 2 × (ConvTranspose k2 s2, ConvNeXt block)              [B, latent, 4T]
      → vocoder ×480: causal conv k7 → decoder_dim; 4 × (SnakeBeta, causal ConvTranspose
        k 2r s r, 3 residual units with dilations 1, 3, 9); SnakeBeta; causal conv k7 → 1
      → clamp to [−1, 1]                                                    [B, 1, 1920·T]

Every stage is causal (left-padded convs, right-trimmed transposed convs, attention over
keys j with i − window < j ≤ i), so output sample s only depends on frames ≤ s // 1920. A
streaming decoder built on these modules needs, per session: the last ``left_pad`` inputs of
every ``CausalConv1d`` (pre_conv, each ConvNeXt dwconv, every vocoder conv), the last input
frame of every ``CausalConvTranspose1d`` with ``trim_right`` > 0, and the rotated keys/values
of the last ``sliding_window − 1`` frames of each attention layer plus the absolute position.
Every stage takes an optional ``stream`` (codec_common.StreamState) that supplies exactly that
history; ``engine/codec_stream.py`` is the streaming decoder built on it.

The official ``decode`` never runs the network over a long sequence in one go: it decodes
chunks of 300 frames, each with up to 25 frames of left context whose output is dropped
(positions restart at 0 in every chunk). :meth:`CodecDecoder.chunked_decode` does the same, so
long outputs equal the official ones sample for sample, seams included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import CodecDecoderConfig
from engine.models.codec_common import (
    CausalConv1d,
    CausalConvTranspose1d,
    CodecAttention,
    LayerScale,
    StreamState,
    causal_mask,
    rope_cos_sin,
    streaming_window_mask,
)

CHUNK_SIZE = 300  # frames per chunk in the official decode (24 s)
LEFT_CONTEXT = 25  # frames of left context re-decoded before every chunk but the first

# --- RVQ dequantizer ------------------------------------------------------------------------


class Codebook(nn.Module):
    """vector i = embedding_sum[i] / max(cluster_usage[i], 1e-5)."""

    epsilon = 1e-5

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("cluster_usage", torch.empty(codebook_size))
        self.register_buffer("embedding_sum", torch.empty(codebook_size, dim))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [...] → vectors [..., dim]. Gathering before dividing gives the same numbers
        as dividing the whole table first, without touching 2048 rows per call."""
        usage = self.cluster_usage[codes].clamp(min=self.epsilon)
        return self.embedding_sum[codes] / usage[..., None]


class VectorQuantization(nn.Module):
    """One level; the module level only mirrors the checkpoint's ``vq.layers.i._codebook``."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self._codebook = Codebook(codebook_size, dim)


class ResidualVectorQuantization(nn.Module):
    def __init__(self, num_levels: int, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(codebook_size, dim) for _ in range(num_levels)])


class ResidualVectorQuantizer(nn.Module):
    """Sum of its levels' vectors, then ``output_proj`` (k1 conv, no bias). ``input_proj`` is
    the training-time encoder side; it is in the checkpoint but unused for decoding."""

    def __init__(self, num_levels: int, codebook_size: int, dim: int, io_dim: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(io_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, io_dim, 1, bias=False)
        self.vq = ResidualVectorQuantization(num_levels, codebook_size, dim)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] → [B, io_dim, T]; levels are added in order, as the reference does."""
        total = self.vq.layers[0]._codebook.decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            total = total + self.vq.layers[k]._codebook.decode(codes[:, k])
        return self.output_proj(total.transpose(1, 2))


class SplitResidualVectorQuantizer(nn.Module):
    """Level 0 (semantic) and levels 1.. (acoustic) have separate tables and projections."""

    def __init__(self, cfg: CodecDecoderConfig) -> None:
        super().__init__()
        dim = cfg.codebook_dim // 2
        size, io_dim = cfg.codebook_size, cfg.codebook_dim
        self.rvq_first = ResidualVectorQuantizer(1, size, dim, io_dim)
        self.rvq_rest = ResidualVectorQuantizer(cfg.num_quantizers - 1, size, dim, io_dim)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.rvq_first.decode(codes[:, :1]) + self.rvq_rest.decode(codes[:, 1:])


# --- pre-transformer ------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class DecoderMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: CodecDecoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = CodecAttention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.mlp = DecoderMLP(d, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(d)
        self.mlp_layer_scale = LayerScale(d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                stream: StreamState | None = None, history: int = 0) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask, stream, history))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class DecoderTransformer(nn.Module):
    """[B, T, latent] → [B, T, latent]; query i sees frames i − window < j ≤ i."""

    def __init__(self, cfg: CodecDecoderConfig) -> None:
        super().__init__()
        self.head_dim, self.rope_theta, self.window = cfg.head_dim, cfg.rope_theta, cfg.sliding_window
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_proj = nn.Linear(cfg.latent_dim, cfg.hidden_size)
        self.output_proj = nn.Linear(cfg.hidden_size, cfg.latent_dim)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        history = 0
        if stream is None:
            cos, sin = rope_cos_sin(torch.arange(t, device=x.device), self.head_dim, self.rope_theta)
            mask = causal_mask(t, self.window, x.device)
        else:
            # Each row is at its own absolute position; keys older than the window are never
            # seen again, so window − 1 cached frames are all a row needs.
            positions = stream.positions(t)
            cos, sin = rope_cos_sin(positions.reshape(-1), self.head_dim, self.rope_theta)
            cos, sin = cos.view(b, 1, t, -1), sin.view(b, 1, t, -1)
            history = self.window - 1
            mask = streaming_window_mask(positions, history, self.window)
        x = self.input_proj(x)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, stream, history)
        return self.output_proj(self.norm(x))


# --- upsampler and vocoder ------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv k7 → LayerNorm(1e-6) → Linear ×4 → GELU → Linear → ×gamma, + x."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = CausalConv1d(dim, dim, kernel_size=7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        h = self.norm(self.dwconv(x, stream).transpose(1, 2))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.transpose(1, 2)


class SnakeBeta(nn.Module):
    """x + sin²(x·e^α) / (e^β + 1e-9), per channel; α and β are stored as logs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(channels))
        self.beta = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        """Pointwise in time: ``stream`` is accepted (as by every decoder stage) and unused."""
        alpha = torch.exp(self.alpha)[None, :, None]
        inv_beta = 1.0 / (torch.exp(self.beta)[None, :, None] + 1e-9)
        return x + inv_beta * torch.sin(x * alpha).pow(2)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv1d(dim, dim, kernel_size=7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv1d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), stream)), stream)


class VocoderBlock(nn.Module):
    """SnakeBeta → causal ConvTranspose (C → C/2, ×rate) → residual units (dilation 1, 3, 9)."""

    def __init__(self, in_dim: int, out_dim: int, rate: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([
            SnakeBeta(in_dim),
            CausalConvTranspose1d(in_dim, out_dim, kernel_size=2 * rate, stride=rate),
            *(ResidualUnit(out_dim, d) for d in (1, 3, 9)),
        ])

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        for layer in self.block:
            x = layer(x, stream)
        return x


def _vocoder(cfg: CodecDecoderConfig) -> nn.ModuleList:
    dims = [cfg.decoder_dim // 2 ** i for i in range(len(cfg.upsample_rates) + 1)]
    return nn.ModuleList([
        CausalConv1d(cfg.latent_dim, dims[0], kernel_size=7),
        *(VocoderBlock(dims[i], dims[i + 1], rate) for i, rate in enumerate(cfg.upsample_rates)),
        SnakeBeta(dims[-1]),
        CausalConv1d(dims[-1], 1, kernel_size=7),
    ])


# --- the decoder ----------------------------------------------------------------------------


class CodecDecoder(nn.Module):
    def __init__(self, cfg: CodecDecoderConfig) -> None:
        super().__init__()
        self.num_quantizers = cfg.num_quantizers
        self.samples_per_frame = math.prod(cfg.upsampling_ratios) * math.prod(cfg.upsample_rates)
        self.pre_transformer = DecoderTransformer(cfg)
        self.quantizer = SplitResidualVectorQuantizer(cfg)
        self.pre_conv = CausalConv1d(cfg.codebook_dim, cfg.latent_dim, kernel_size=3)
        d = cfg.latent_dim
        self.upsample = nn.ModuleList([
            nn.ModuleList([CausalConvTranspose1d(d, d, kernel_size=r, stride=r), ConvNeXtBlock(d)])
            for r in cfg.upsampling_ratios
        ])
        self.decoder = _vocoder(cfg)

    def forward(self, codes: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        """One pass over the whole sequence: codes [B, K, T] (ids ≥ 0) → audio [B, 1, 1920·T].

        Positions start at 0: use :meth:`chunked_decode` for the official long-input behaviour.
        With ``stream``, the codes continue each row's earlier calls (see the module docstring).
        """
        return self.vocode(self.latent(codes, stream), stream)

    def latent(self, codes: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        """The frame-rate half: codes [B, K, T] → dequantize, pre_conv, transformer → [B, latent, T]."""
        if codes.shape[1] != self.num_quantizers:
            raise ValueError(f"expected {self.num_quantizers} codebooks, got {codes.shape[1]}")
        x = self.pre_conv(self.quantizer.decode(codes), stream)
        return self.pre_transformer(x.transpose(1, 2), stream).transpose(1, 2)

    def vocode(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        """The convolutional half: latent [B, latent, T] → upsample, vocoder, clamp → [B, 1, 1920·T]."""
        for stage in self.upsample:
            for layer in stage:
                x = layer(x, stream)
        for layer in self.decoder:
            x = layer(x, stream)
        return x.clamp(min=-1.0, max=1.0)

    def chunked_decode(self, codes: torch.Tensor, chunk_size: int = CHUNK_SIZE,
                       left_context: int = LEFT_CONTEXT) -> torch.Tensor:
        """The official decode: chunks of ``chunk_size`` frames, each decoded from scratch
        with ``min(left_context, start)`` frames before it whose audio is dropped.

        Equal to :meth:`forward` for T ≤ chunk_size. Beyond, seams differ slightly from a
        single pass (the network's receptive field exceeds 25 frames); we reproduce the
        official output, not the single pass.
        """
        out = []
        for start in range(0, codes.shape[-1], chunk_size):
            context = min(left_context, start)
            audio = self(codes[..., start - context: start + chunk_size])
            out.append(audio[..., context * self.samples_per_frame:])
        return torch.cat(out, dim=-1)
