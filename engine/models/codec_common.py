"""Building blocks shared by the codec encoder and decoder (spec §5).

Everything here is causal and explicit about its padding, so a streaming decoder can reuse
the same modules: a causal conv needs the last ``left_pad`` input samples as history
(``forward_padded`` takes input that already carries them), a causal transposed conv drops
``trim_right`` output samples that the next input frame completes, and attention exposes its
projected (rotated) keys and values so a window of them can be cached.

The streaming hook is an optional ``stream`` argument (a :class:`StreamState`, implemented in
``engine/codec_stream.py``): given one, a module prepends each row's cached history to its
input instead of zero padding, so a sequence fed in pieces gives the same output as in one go.
Without it every module behaves exactly as before.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class StreamState(Protocol):
    """Per-row history that a streaming caller keeps between calls of the same modules."""

    def extend(self, key: object, x: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
        """``cat(history, x)`` along ``dim``, where history is the last ``keep`` steps that ``key``
        saw for each row before (zeros for a new row), and remember the new last ``keep``."""
        ...

    def positions(self, length: int) -> torch.Tensor:
        """[B, length] absolute frame positions of the new frames of each row."""
        ...


class CausalConv1d(nn.Module):
    """Conv1d with all of its padding on the left: output t sees inputs ≤ t·stride.

    The right side is padded just enough to complete a last partial stride, so the output has
    exactly ``ceil(length / stride)`` frames (Mimi / Qwen ``CausalConvNet`` semantics).
    ``pad_mode`` is ``"constant"`` (zeros) everywhere except Mimi's downsampling conv, which
    repeats the edge samples (``"replicate"``) on both sides.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, pad_mode: str = "constant") -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                              groups=groups, bias=bias)
        self.stride = stride
        self.pad_mode = pad_mode
        # Span of the dilated kernel minus one stride: the history each output frame needs.
        self.left_pad = (kernel_size - 1) * dilation + 1 - stride

    def right_pad(self, length: int) -> int:
        """Zeros (or edge copies) that complete the last stride of a ``length``-sample input."""
        return -length % self.stride

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        if stream is not None:
            # The cached history takes the place of the zero left pad (stride-1 convs only:
            # the decoder's; a strided conv would also need its partial stride kept).
            if self.stride != 1:
                raise ValueError("streaming needs a stride-1 conv")
            return self.forward_padded(stream.extend(self, x, self.left_pad, -1))
        pad = (self.left_pad, self.right_pad(x.shape[-1]))
        if self.pad_mode == "constant":
            x = F.pad(x, pad)
        else:
            x = F.pad(x, pad, mode=self.pad_mode)
        return self.conv(x)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution of input that already starts with ``left_pad`` samples of history
        (a streaming caller's cached tail) and ends on a stride boundary."""
        return self.conv(x)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d whose last ``kernel_size - stride`` output samples are dropped.

    Those samples are partial sums that only become complete with the next input frame, so
    ``n`` input frames give exactly ``n · stride`` outputs. A streaming caller keeps the last
    input frame (or the trimmed tail) and adds it to the next chunk's head.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.trim_right = kernel_size - stride

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        if stream is not None and self.trim_right:
            # Recompute from the last input frames whose kernels reach into the new output, and
            # keep only the samples the new frames own: n frames in, n·stride samples out.
            history = -(-self.trim_right // self.stride)
            y = self.conv(stream.extend(self, x, history, -1))
            start = history * self.stride
            return y[..., start: start + x.shape[-1] * self.stride]
        y = self.conv(x)
        return y[..., : y.shape[-1] - self.trim_right] if self.trim_right else y


class LayerScale(nn.Module):
    """Per-channel residual-branch scale (``scale`` in the checkpoint)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] for rotate-half RoPE, computed in fp32.

    Computed per call rather than stored: a non-persistent buffer would stay on the meta
    device after a meta build + ``load_state_dict(assign=True)``.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
                               .float() / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, head_dim] rotated by position (split-halves / NeoX convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [T, T] mask, True where query i may see key j: j ≤ i and (if windowed) j > i − window.

    ``None`` when plain causal attention suffices (SDPA's ``is_causal`` path).
    """
    if window is None or length <= window:
        return None
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (j > i - window)


def streaming_window_mask(positions: torch.Tensor, history: int, window: int) -> torch.Tensor:
    """Boolean [B, 1, T, history + T] mask for queries at ``positions`` [B, T] (consecutive per
    row) over ``history`` cached keys followed by the T new ones: True where the key exists
    (position ≥ 0: a young row has fewer cached keys than slots) and q − window < k ≤ q."""
    keys = positions[:, :1] - history + torch.arange(history + positions.shape[1], device=positions.device)
    q, k = positions[:, :, None], keys[:, None, :]
    return ((k >= 0) & (k <= q) & (k > q - window))[:, None]


class CodecAttention(nn.Module):
    """Multi-head self-attention with RoPE and no biases (both codec transformers)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] → rotated q [B, H, T, hd], rotated k and v [B, Hkv, T, hd] (cacheable)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        """Softmax attention of q over k/v (which may include cached past keys) → [B, Tq, D]."""
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                stream: StreamState | None = None, history: int = 0) -> torch.Tensor:
        """Causal self-attention over the whole sequence; ``mask`` adds the window if any.

        With ``stream``, the rotated keys/values of each row's last ``history`` frames come
        first and ``mask`` (from :func:`streaming_window_mask`) says which of them a query sees.
        """
        q, k, v = self.project_qkv(x, cos, sin)
        if stream is not None:
            k = stream.extend((self, "k"), k, history, 2)
            v = stream.extend((self, "v"), v, history, 2)
            return self.attend(q, k, v, mask, is_causal=False)
        return self.attend(q, k, v, mask, is_causal=x.shape[1] > 1)
