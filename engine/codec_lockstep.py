"""The codec decoder in lockstep: every stream advances one frame per call, all in one fixed-shape call.

The codec decoder is fully causal, so a stream keeps exactly the history its modules need (see
``engine/models/codec_decoder.py``) and runs only its new frame through it:

- the last ``left_pad`` input samples of every causal conv (pre_conv, the ConvNeXt depthwise
  convs, every vocoder conv including the dilated ones);
- the last input frame of every causal transposed conv that trims its output (the vocoder's
  4 upsampling layers), whose kernel tail reaches into the next frame's samples;
- the rotated keys/values of the last ``sliding_window − 1`` frames of each attention layer,
  and the stream's absolute frame position (RoPE positions and the window are absolute).

That state lives in a :class:`SlotPool` allocated once for ``capacity`` streams, plus one scratch
row. A call decodes ``[bucket, 1]`` frames: the first n rows are the streams that have a frame,
the others are padding rows that all point at the scratch row (their output is never read and the
scratch row is never handed out), so each bucket is one shape that CUDA captures once and replays
(:class:`engine.cuda_graphs.StaticCall`); on CPU the same function runs on the same static
buffers. Rows never mix: every op is per row and attention masks each row's own window, so a
stream's audio does not depend on who shares its call.

Why one frame per call rather than the chunk's frames: decoding is decoupled from sending (PCM
accumulates per stream until its chunk is due), so every stream has exactly one new frame per
engine step and one call per step serves all of them, whatever their chunk phases. The landed
design decoded a chunk's frames when it fell due, one call per distinct pending count: more calls
per step and shapes that change every step. Measured costs are in bench/RESULTS.md (bench/codec.py).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import numpy as np
import torch

from engine.api import EngineError
from engine.cuda_graphs import BUCKETS, StaticCall
from engine.models.codec_common import CausalConv1d, CausalConvTranspose1d
from engine.models.codec_decoder import CodecDecoder

StateRows = dict[object, torch.Tensor]  # one stream's state: key → its row (what a pool row holds)


class SlotPool:
    """Per-stream decoder state in tensors ``[capacity + 1, *shape]``, one row ("slot") per stream.

    A key is a stateful module (or an ``(attention, "k" | "v")`` pair); its tensor appears on the
    first (warm-up) call, shaped like what that module keeps, and never grows: a stream beyond
    ``capacity`` is refused. Row ``capacity`` is the scratch row padding rows read and write. A slot
    is zeroed when handed out: zeros are exactly the one-pass decode's left padding, and no history
    survives its previous owner.
    """

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        self.scratch = capacity
        self.tensors: dict[object, torch.Tensor] = {}
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # popped from the end: lowest first

    @property
    def num_used(self) -> int:
        return self.capacity - len(self.free)

    @property
    def bytes_per_stream(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @torch.inference_mode()  # the pooled tensors are inference tensors: only written in this mode
    def acquire(self, state: StateRows | None = None) -> int:
        """A zeroed slot, or one holding ``state`` (a cached reference prefill)."""
        if not self.free:
            raise EngineError("OVERLOADED", f"the codec holds state for {self.capacity} streams, all in use")
        slot = self.free.pop()
        for key, t in self.tensors.items():
            row = None if state is None else state.get(key)
            if row is None:
                t[slot].zero_()
            else:
                t[slot].copy_(row)
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def tensor(self, key: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            t = self.tensors[key] = torch.zeros(self.capacity + 1, *shape, dtype=dtype, device=self.device)
        elif t.shape[1:] != shape or t.dtype != dtype:
            raise ValueError(f"stream state for {key!r} is {tuple(t.shape[1:])} {t.dtype}, got {shape} {dtype}")
        return t


class _Rows:
    """The ``StreamState`` of a lockstep call: row i is pool slot ``slots[i]``, whose new frame is at
    absolute position ``starts[i]``. Both are views of persistent buffers: the call never builds one."""

    def __init__(self, pool: SlotPool, slots: torch.Tensor, starts: torch.Tensor) -> None:
        self.pool, self.slots, self.starts = pool, slots, starts

    def positions(self, length: int) -> torch.Tensor:
        return self.starts[:, None] + torch.arange(length, device=self.starts.device)

    def extend(self, key: object, x: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
        if keep == 0:
            return x
        dim %= x.dim()
        shape = list(x.shape[1:])
        shape[dim - 1] = keep
        store = self.pool.tensor(key, tuple(shape), x.dtype)
        out = torch.cat([store.index_select(0, self.slots), x], dim)
        store.index_copy_(0, self.slots, out.narrow(dim, out.shape[dim] - keep, keep))
        return out


class _OneRow:
    """The ``StreamState`` of a reference prefill: one fresh stream at position 0, state in a dict."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state: StateRows = {}

    def positions(self, length: int) -> torch.Tensor:
        return torch.arange(length, device=self.device)[None]

    def extend(self, key: object, x: torch.Tensor, keep: int, dim: int) -> torch.Tensor:
        if keep == 0:
            return x
        dim %= x.dim()
        history = self.state.get(key)
        if history is None:
            shape = list(x.shape)
            shape[dim] = keep
            history = x.new_zeros(shape)
        else:
            history = history[None]
        out = torch.cat([history, x], dim)
        self.state[key] = out.narrow(dim, out.shape[dim] - keep, keep)[0].clone()
        return out


def vocode_history_frames(decoder: CodecDecoder) -> int:
    """How many trailing latent frames the state of ``decoder.vocode`` can depend on.

    Each stateful conv looks ``left_pad`` input samples back, each trimming transposed conv a
    few input frames; in latent frames that is history / (samples per frame at that layer).
    The sum over the chain bounds the dependence (≈ 9.4 frames for Qwen3-TTS, mostly the
    ConvNeXt and first vocoder stages); one more frame covers the rounding.
    """
    rate, frames = 1, 0.0  # rate: samples per latent frame at the current layer's input
    for module in [*decoder.upsample.modules(), *decoder.decoder.modules()]:
        if isinstance(module, CausalConv1d):
            frames += module.left_pad / rate
        elif isinstance(module, CausalConvTranspose1d):
            frames += -(-module.trim_right // module.stride) / rate
            rate *= module.stride
    return math.ceil(frames) + 1


class LockstepDecoder:
    """``CodecDecoder`` over a :class:`SlotPool`: one frame for up to ``capacity`` streams per call."""

    def __init__(self, decoder: CodecDecoder, device: torch.device, capacity: int, cuda_graphs: bool = True) -> None:
        self.decoder, self.device = decoder, device
        self.pool = SlotPool(device, capacity)
        self.vocode_history = vocode_history_frames(decoder)
        self.buckets = [b for b in BUCKETS if b < capacity] + [capacity]
        k, spf = decoder.num_quantizers, decoder.samples_per_frame
        # Host staging, written through numpy views (no tensor per call); on CPU it is the device buffer.
        pin = device.type == "cuda"
        self._host_slots = torch.full((capacity,), self.pool.scratch, dtype=torch.long, pin_memory=pin)
        self._host_starts = torch.zeros(capacity, dtype=torch.long, pin_memory=pin)
        self._host_codes = torch.zeros(capacity, k, 1, dtype=torch.long, pin_memory=pin)
        self._host_audio = torch.zeros(capacity, spf, dtype=torch.float32, pin_memory=pin)
        self._np_slots, self._np_starts = self._host_slots.numpy(), self._host_starts.numpy()
        self._np_codes, self._np_audio = self._host_codes.numpy()[:, :, 0], self._host_audio.numpy()
        if pin:
            self.slots, self.starts = self._host_slots.to(device), self._host_starts.to(device)
            self.codes = self._host_codes.to(device)
        else:
            self.slots, self.starts, self.codes = self._host_slots, self._host_starts, self._host_codes
        self._calls: dict[int, Callable[[], torch.Tensor]] = {}
        # Graphs only on CUDA and when asked (EngineConfig.cuda_graphs); otherwise the same functions run
        # plainly on the same static buffers.
        capture = device.type == "cuda" and cuda_graphs
        graph_pool = torch.cuda.graph_pool_handle() if capture else None
        with torch.inference_mode():
            # One padding-only call creates every state tensor now, at full size: serving never allocates
            # state, and acquire() finds every key it must zero or fill. On CPU the smallest bucket does
            # (the pool's rows do not depend on it; a large one would leave its activations resident); on
            # CUDA the largest, so that the allocator holds the working memory of a full call before the
            # engine sizes its KV pool from what is free (the graphs' own pool is allocated at capture).
            self._call_fn(self.buckets[0 if device.type == "cpu" else -1])()
            for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
                fn = self._call_fn(b)
                self._calls[b] = StaticCall(fn, device, graph_pool) if capture else fn
            for t in self.pool.tensors.values():  # nothing of the warm-up stays
                t.zero_()

    def _call_fn(self, b: int) -> Callable[[], torch.Tensor]:
        rows = _Rows(self.pool, self.slots[:b], self.starts[:b])
        codes = self.codes[:b]
        return lambda: self.decoder(codes, rows)[:, 0]

    def bucket(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    @torch.inference_mode()
    def step(self, slots: list[int], starts: list[int], frames: list[list[int]]) -> np.ndarray:
        """One frame [K] per stream (slot, absolute position) → audio [n, 1920] (a view: copy what you keep)."""
        n = len(slots)
        b = self.bucket(n)
        self._np_slots[:n], self._np_starts[:n], self._np_codes[:n] = slots, starts, frames
        self._np_slots[n:b], self._np_starts[n:b], self._np_codes[n:b] = self.pool.scratch, 0, 0
        if self.device.type == "cuda":
            self.slots[:b].copy_(self._host_slots[:b], non_blocking=True)
            self.starts[:b].copy_(self._host_starts[:b], non_blocking=True)
            self.codes[:b].copy_(self._host_codes[:b], non_blocking=True)
        audio = self._calls[b]()
        if audio.device.type == "cpu":
            return audio[:n].numpy()
        self._host_audio[:n].copy_(audio[:n])  # synchronous: the audio leaves the device now
        return self._np_audio[:n]

    @torch.inference_mode()
    def prefill(self, codes: torch.Tensor) -> StateRows:
        """A fresh stream's state after reference codes [T, K] (their audio is not needed)."""
        state = _OneRow(self.device)
        latent = self.decoder.latent(codes.to(self.device, torch.long).T[None], state)
        # The vocode half starts from zero state on the last frames only: its state after the
        # reference depends on no more than those, so it ends up as after the whole reference.
        self.decoder.vocode(latent[..., -self.vocode_history:], state)
        return state.state
