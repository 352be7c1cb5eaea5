"""12 Hz codec encoder: 24 kHz audio → 16 codes per 80 ms frame (spec §5.2).

It is Kyutai's Mimi encoder with the checkpoint's own (Mimi-default) sizes:

    audio [B, 1, n]
      → SEANet: causal conv 1→F (k7); per ratio r in (4, 5, 6, 8): residual block, ELU,
        strided causal conv C→2C (k 2r, stride r); ELU; causal conv → hidden (k3)     [B, 512, n/960]
      → transformer: 8 pre-LayerNorm layers, RoPE, causal, LayerScale on both branches
      → downsample: causal conv k4 stride 2, edge-replicating padding                 [B, 512, n/1920]
      → split RVQ: a semantic and an acoustic residual quantizer, each with its own input
        projection of the SAME embedding; nearest codebook vector by Euclidean distance.

Output frame t only depends on audio up to sample 1920·(t+1) (plus the right padding that
completes the last frame), so ``ceil(n / 1920)`` frames come out.

Note on the transformer: the config's ``sliding_window`` (250 frames at 25 Hz = 10 s) is NOT
applied: transformers 4.57.3, which the official code runs on, builds a plain causal mask for
Mimi. We match it, so codes of references longer than 10 s equal the official ones too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import CodecEncoderConfig
from engine.models.codec_common import CausalConv1d, CodecAttention, LayerScale, rope_cos_sin


class SeanetResidualBlock(nn.Module):
    """ELU → conv k3 (C → C/compress) → ELU → conv k1 (back to C), plus identity shortcut.

    ``block`` keeps the activations as entries so indices match the checkpoint (block.1, block.3).
    """

    def __init__(self, channels: int, cfg: CodecEncoderConfig, dilation: int) -> None:
        super().__init__()
        hidden = channels // cfg.compress
        self.block = nn.ModuleList([
            nn.ELU(),
            CausalConv1d(channels, hidden, cfg.residual_kernel_size, dilation=dilation),
            nn.ELU(),
            CausalConv1d(hidden, channels, 1),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.block:
            h = layer(h)
        return x + h


class SeanetEncoder(nn.Module):
    """Causal SEANet conv stack, 24 kHz → 25 Hz (``prod(upsampling_ratios)`` = 960 samples)."""

    def __init__(self, cfg: CodecEncoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(cfg.audio_channels, cfg.num_filters, cfg.kernel_size)]
        channels = cfg.num_filters
        for ratio in reversed(cfg.upsampling_ratios):  # the config lists the decoder's order
            for j in range(cfg.num_residual_layers):
                layers.append(SeanetResidualBlock(channels, cfg, dilation=cfg.dilation_growth_rate ** j))
            layers.append(nn.ELU())
            layers.append(CausalConv1d(channels, 2 * channels, kernel_size=2 * ratio, stride=ratio))
            channels *= 2
        layers.append(nn.ELU())
        layers.append(CausalConv1d(channels, cfg.hidden_size, cfg.last_kernel_size))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EncoderMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.fc2 = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CodecEncoderConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = CodecAttention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.mlp = EncoderMLP(d, cfg.intermediate_size)
        self.input_layernorm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.self_attn_layer_scale = LayerScale(d)
        self.mlp_layer_scale = LayerScale(d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, None))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class EncoderTransformer(nn.Module):
    """Causal transformer over the 25 Hz frames; positions 0..T−1, no final norm, no window
    (see the module docstring)."""

    def __init__(self, cfg: CodecEncoderConfig) -> None:
        super().__init__()
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(torch.arange(x.shape[1], device=x.device), self.head_dim, self.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class EuclideanCodebook(nn.Module):
    """Codebook stored as running sums: vector i = embed_sum[i] / max(cluster_usage[i], 1e-5).

    ``initialized`` is Mimi's training bookkeeping; it is kept only so the checkpoint loads
    strictly.
    """

    epsilon = 1e-5

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.empty(1))
        self.register_buffer("cluster_usage", torch.empty(codebook_size))
        self.register_buffer("embed_sum", torch.empty(codebook_size, dim))

    def vectors(self) -> torch.Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] → (nearest indices [N], their vectors [N, dim])."""
        vectors = self.vectors()
        # cdist (not a hand-written distance) so near-ties resolve exactly as in the reference.
        indices = torch.cdist(x[None].float(), vectors[None].float(), p=2)[0].argmin(dim=-1)
        return indices, F.embedding(indices, vectors)


class QuantizerLayer(nn.Module):
    """One RVQ level; the extra module level only mirrors the checkpoint's ``layers.i.codebook``."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.codebook = EuclideanCodebook(codebook_size, dim)


class ResidualVectorQuantizer(nn.Module):
    """input_proj (k1 conv, hidden → codebook dim), then each level quantizes the residual
    the previous levels left. ``output_proj`` is only used by Mimi's decoder (not here)."""

    def __init__(self, cfg: CodecEncoderConfig, num_levels: int) -> None:
        super().__init__()
        dim = cfg.vector_quantization_hidden_dimension
        self.layers = nn.ModuleList([QuantizerLayer(cfg.codebook_size, dim) for _ in range(num_levels)])
        self.input_proj = nn.Conv1d(cfg.hidden_size, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, cfg.hidden_size, 1, bias=False)

    def encode(self, x: torch.Tensor, num_levels: int) -> torch.Tensor:
        """x [B, hidden, T] → codes [B, num_levels, T] of the first ``num_levels`` levels."""
        residual = self.input_proj(x).transpose(1, 2)  # [B, T, dim]
        b, t, dim = residual.shape
        residual = residual.reshape(b * t, dim)
        codes = []
        for layer in self.layers[:num_levels]:
            indices, quantized = layer.codebook.quantize(residual)
            residual = residual - quantized
            codes.append(indices.view(b, t))
        return torch.stack(codes, dim=1)


class SplitResidualVectorQuantizer(nn.Module):
    """Semantic RVQ (first ``num_semantic_quantizers`` codes) and acoustic RVQ (the rest),
    both applied to the same 12.5 Hz embedding."""

    def __init__(self, cfg: CodecEncoderConfig) -> None:
        super().__init__()
        self.num_semantic = cfg.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = ResidualVectorQuantizer(cfg, self.num_semantic)
        self.acoustic_residual_vector_quantizer = ResidualVectorQuantizer(
            cfg, cfg.num_quantizers - self.num_semantic)

    def encode(self, x: torch.Tensor, num_codes: int) -> torch.Tensor:
        """x [B, hidden, T] → codes [B, num_codes, T]. Later levels never influence earlier
        ones, so computing only the kept ``num_codes`` levels gives the reference's codes."""
        semantic = self.semantic_residual_vector_quantizer.encode(x, self.num_semantic)
        if num_codes <= self.num_semantic:
            return semantic[:, :num_codes]
        acoustic = self.acoustic_residual_vector_quantizer.encode(x, num_codes - self.num_semantic)
        return torch.cat([semantic, acoustic], dim=1)


class CodecEncoder(nn.Module):
    """Mimi encoder keeping the first ``num_codes`` of its ``num_quantizers`` codes per frame."""

    def __init__(self, cfg: CodecEncoderConfig, num_codes: int) -> None:
        super().__init__()
        if not cfg.num_semantic_quantizers <= num_codes <= cfg.num_quantizers:
            raise ValueError(f"cannot keep {num_codes} of {cfg.num_quantizers} codes")
        self.num_codes = num_codes
        hop = math.prod(cfg.upsampling_ratios)
        # Mimi: the SEANet runs at ceil(sr / hop) Hz; a stride-2 conv with kernel 2·ratio
        # brings it down to the codec frame rate.
        ratio = int(math.ceil(cfg.sampling_rate / hop) / cfg.frame_rate)
        if ratio != 2:
            raise ValueError(f"unsupported encoder frame rate {cfg.frame_rate} (SEANet hop {hop})")
        self.samples_per_frame = hop * 2
        self.encoder = SeanetEncoder(cfg)
        self.encoder_transformer = EncoderTransformer(cfg)
        self.downsample = CausalConv1d(cfg.hidden_size, cfg.hidden_size, kernel_size=2 * ratio, stride=2,
                                       bias=False, pad_mode="replicate")
        self.quantizer = SplitResidualVectorQuantizer(cfg)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, n] float32 at 24 kHz → codes [B, num_codes, ceil(n / 1920)] int64."""
        x = self.encoder(audio[:, None, :].float())
        x = self.encoder_transformer(x.transpose(1, 2)).transpose(1, 2)
        x = self.downsample(x)
        return self.quantizer.encode(x, self.num_codes)
