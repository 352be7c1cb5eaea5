"""ECAPA-TDNN speaker encoder (x-vector for voice cloning), spec §1.4.

Mel [B, T, 128] → TDNN → 3 SE-Res2Net blocks → multi-layer aggregation → attentive statistics
pooling → [B, enc_dim]. No BatchNorm. Every conv is "same"-padded with *reflect* padding
(not zeros), which matters at the clip edges; the padding is done explicitly here so k=1 convs
(most of the compute) skip it. Module and attribute names follow the checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.audio import AudioError
from engine.config import SpeakerEncoderConfig
from engine.mel import SAMPLE_RATE, log_mel_spectrogram, min_samples_for_frames


class TDNN(nn.Module):
    """Conv1d (reflect "same" padding) + ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation)
        total = dilation * (kernel_size - 1)
        self.pad = (total // 2, total - total // 2)  # torch's split for padding="same"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad != (0, 0):
            x = F.pad(x, self.pad, mode="reflect")
        return F.relu(self.conv(x))


class Res2Net(nn.Module):
    """Split channels into ``scale`` groups; group i>0 sees its input plus group i-1's output,
    so later groups get growing receptive fields. Group 0 passes through."""

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(TDNN(width, width, kernel_size, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(torch.chunk(x, self.scale, dim=1))
        out = parts[0]
        outs = [out]
        for i, block in enumerate(self.blocks):
            out = block(parts[i + 1] if i == 0 else parts[i + 1] + out)
            outs.append(out)
        return torch.cat(outs, dim=1)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, se_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, se_channels, 1)
        self.conv2 = nn.Conv1d(se_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.conv2(F.relu(self.conv1(x.mean(dim=2, keepdim=True)))))
        return x * s


class SERes2NetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, scale: int, se_channels: int, kernel_size: int,
                 dilation: int) -> None:
        super().__init__()
        self.tdnn1 = TDNN(c_in, c_out, 1, 1)
        self.res2net_block = Res2Net(c_out, scale, kernel_size, dilation)
        self.tdnn2 = TDNN(c_out, c_out, 1, 1)
        self.se_block = SqueezeExcite(c_out, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def _mean_std(x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over time, uniform (w=None) or weighted by w (sums to 1 over time)."""
    if w is None:
        mean = x.mean(dim=2)
        var = (x - mean[..., None]).pow(2).mean(dim=2)
    else:
        mean = (w * x).sum(dim=2)
        var = (w * (x - mean[..., None]).pow(2)).sum(dim=2)
    return mean, torch.sqrt(var.clamp(min=1e-12))


class AttentivePooling(nn.Module):
    """Attentive statistics pooling: per-channel softmax attention over time (conditioned on
    the clip's global mean/std), then the attention-weighted mean and std."""

    def __init__(self, channels: int, attention_channels: int) -> None:
        super().__init__()
        self.tdnn = TDNN(channels * 3, attention_channels, 1, 1)
        self.conv = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        mean, std = _mean_std(x, None)
        # The reference concatenates [x, mean, std] repeated over time (3C x T) before a k=1
        # conv; mean and std are constant in time, so their part of the conv is one GEMV.
        w = self.tdnn.conv.weight[:, :, 0]
        ctx = F.linear(torch.cat([mean, std], dim=1), w[:, c:], self.tdnn.conv.bias)
        h = torch.relu(F.conv1d(x, w[:, :c, None]) + ctx[..., None])
        attn = torch.softmax(self.conv(torch.tanh(h)), dim=2)
        mean, std = _mean_std(x, attn)
        return torch.cat([mean, std], dim=1)[..., None]


class SpeakerEncoder(nn.Module):
    def __init__(self, cfg: SpeakerEncoderConfig) -> None:
        super().__init__()
        ch, ks, dil = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        if not len(ch) == len(ks) == len(dil) >= 3:
            raise ValueError("enc_channels, enc_kernel_sizes and enc_dilations need one entry per layer")
        self.cfg = cfg
        self.blocks = nn.ModuleList([TDNN(cfg.mel_dim, ch[0], ks[0], dil[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SERes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels,
                                              ks[i], dil[i]))
        self.mfa = TDNN(ch[-1], ch[-1], ks[-1], dil[-1])
        self.asp = AttentivePooling(ch[-1], cfg.enc_attention_channels)
        self.fc = nn.Conv1d(ch[-1] * 2, cfg.enc_dim, 1)
        # Reflect padding needs more frames than the widest one-sided pad.
        self.min_frames = 1 + max(d * (k - 1) - d * (k - 1) // 2 for k, d in zip(ks, dil, strict=True))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, T, mel_dim] log-mel → [B, enc_dim] x-vector."""
        if mel.shape[1] < self.min_frames:
            raise ValueError(f"speaker encoder needs at least {self.min_frames} mel frames, "
                             f"got {mel.shape[1]}")
        x = mel.transpose(1, 2)
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        x = self.mfa(torch.cat(feats[1:], dim=1))
        return self.fc(self.asp(x))[..., 0]

    @torch.inference_mode()
    def embed(self, audio_24k: torch.Tensor) -> torch.Tensor:
        """[n] 24 kHz mono float samples in [-1, 1] → [enc_dim] x-vector, in the weights' dtype.

        The mel is computed in fp32 on the weights' device and cast afterwards, as the official
        ``extract_speaker_embedding`` does.
        """
        need = min_samples_for_frames(self.min_frames)
        if audio_24k.ndim != 1 or audio_24k.shape[0] < need:
            raise AudioError("AUDIO_TOO_SHORT", f"reference audio must be mono and at least {need} samples "
                                                f"({need / SAMPLE_RATE * 1000:.0f} ms at 24 kHz); "
                                                f"got shape {tuple(audio_24k.shape)}")
        weight = self.fc.weight
        mel = log_mel_spectrogram(audio_24k.to(device=weight.device, dtype=torch.float32))
        return self.forward(mel.to(weight.dtype))[0]

