"""Frames → PCM chunks per request, on the chunk schedule (small first chunks, larger later).

A stateful streaming decoder, batched across requests. The codec decoder is fully causal, so
instead of re-decoding a request's whole code history for every chunk we keep, per request,
exactly the history its modules need (see ``engine/models/codec_decoder.py``) and run only the
new frames through it:

- the last ``left_pad`` input samples of every causal conv (pre_conv, the ConvNeXt depthwise
  convs, every vocoder conv including the dilated ones);
- the last input frame of every causal transposed conv that trims its output (the vocoder's
  4 upsampling layers), whose kernel tail reaches into the next frame's samples;
- the rotated keys/values of the last ``sliding_window − 1`` frames of each attention layer,
  and the request's absolute frame position (RoPE positions and the window are absolute).

That state lives in pooled tensors with one row ("slot") per open request (:class:`SlotPool`).
A decode call gathers the rows of the requests it serves, prepends them to the new input of
each module, and writes the new tails back (:class:`_Rows`). Rows never mix: every op is per
row, and attention masks each row's own window, so a request's audio does not depend on who
shares its batch (and an ICL reference only ever conditions its own request).

Batching: a request's frames are decoded when its chunk is due. All due requests with the same
number of pending frames go through the decoder together, one call per distinct count; the
engine pushes one frame per request per step, so requests started together share every call.

ICL requests: :meth:`CodecStream.open` runs the reference codes through the decoder to fill
the state and discards their audio, which is the offline path's "decode reference + generated,
cut the reference part". The transformer sees the whole reference; the convolutional half only
the last few frames its state can depend on (:func:`vocode_history_frames`), which gives the
same state for a fraction of the cost.

Deadline flush: the schedule's larger chunks assume generation runs at least twice as fast as
playback (a chunk of n frames must be made while the n/2 before it play). When it does not, a
stream sends what it has as soon as waiting for the full chunk would let its listener's buffer
(audio sent minus time since the first chunk) run dry, judged from the measured time per step.
So a stream underruns only if generation is slower than real time, not whenever it is below 2x
(and when it is slower than real time, the schedule stands: small chunks would only cost more).

Equality: every generated frame yields exactly ``samples_per_frame`` samples, equal (to float
rounding, ≤ 1e-5) to the one-pass ``CodecDecoder.forward`` over reference + generated codes,
for any chunk schedule. The official ``decode`` is ``chunked_decode(300, 25)``: it restarts
positions and drops all but 25 frames of context every 300 frames, so it equals the one-pass
decode only while reference + generated ≤ 300 frames. Beyond that the two differ near its
chunk seams and this stream follows the one-pass decode, the exact causal answer.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.models.codec_common import CausalConv1d, CausalConvTranspose1d
from engine.models.codec_decoder import CodecDecoder
from engine.models.speech_tokenizer import SpeechTokenizer


@dataclass
class Chunk:
    request_id: str
    samples: np.ndarray
    first_frame: int
    num_frames: int


class SlotPool:
    """Per-request decoder state in pooled tensors ``[capacity, *shape]``, one row per slot.

    A key is a stateful module (or an ``(attention, "k" | "v")`` pair); its tensor appears on
    first use, shaped like what that module keeps. A slot is zeroed when handed out: zeros are
    exactly the one-pass decode's left padding, and no history survives its previous owner.
    """

    def __init__(self, device: torch.device, capacity: int = 4) -> None:
        self.device = device
        self.capacity = capacity
        self.tensors: dict[object, torch.Tensor] = {}
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # popped from the end: lowest first

    @property
    def num_used(self) -> int:
        return self.capacity - len(self.free)

    @torch.inference_mode()  # the pooled tensors are inference tensors: only written in this mode
    def acquire(self) -> int:
        if not self.free:
            self._grow(2 * self.capacity)
        slot = self.free.pop()
        for t in self.tensors.values():
            t[slot].zero_()
        return slot

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def tensor(self, key: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            t = self.tensors[key] = torch.zeros(self.capacity, *shape, dtype=dtype, device=self.device)
        elif t.shape[1:] != shape or t.dtype != dtype:
            raise ValueError(f"stream state for {key!r} is {tuple(t.shape[1:])} {t.dtype}, got {shape} {dtype}")
        return t

    def _grow(self, capacity: int) -> None:
        for key, t in self.tensors.items():
            self.tensors[key] = torch.cat([t, t.new_zeros(capacity - self.capacity, *t.shape[1:])])
        self.free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity = capacity


class _Rows:
    """The ``StreamState`` of one batched decoder call: row i is pool slot ``slots[i]``, whose
    new frames start at absolute position ``starts[i]``."""

    def __init__(self, pool: SlotPool, slots: list[int], starts: list[int]) -> None:
        self.pool = pool
        self.slots = torch.tensor(slots, dtype=torch.long, device=pool.device)
        self.starts = torch.tensor(starts, dtype=torch.long, device=pool.device)

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


class StreamingDecoder:
    """``CodecDecoder`` over pooled per-request state: open a slot, prefill it, decode into it."""

    # Reference states kept per distinct reference (a registered voice is reused by many requests):
    # a cached prefill is a row copy instead of a decoder pass on the engine thread.
    PREFILL_CACHE_SIZE = 32

    def __init__(self, decoder: CodecDecoder, device: torch.device) -> None:
        self.decoder = decoder
        self.device = device
        self.pool = SlotPool(device)
        self.vocode_history = vocode_history_frames(decoder)
        self._prefilled: OrderedDict[bytes, dict[object, torch.Tensor]] = OrderedDict()

    def open(self) -> int:
        return self.pool.acquire()

    def close(self, slot: int) -> None:
        self.pool.release(slot)

    @torch.inference_mode()
    def prefill(self, slot: int, codes: torch.Tensor) -> None:
        """Bring a fresh slot to the state after reference codes [T, K] (their audio is not needed)."""
        key = codes.to("cpu", torch.long).numpy().tobytes() + bytes(str(tuple(codes.shape)), "ascii")
        state = self._prefilled.get(key)
        if state is None:
            self._run_prefill(slot, codes)
            state = {k: t[slot].clone() for k, t in self.pool.tensors.items()}
            self._prefilled[key] = state
            if len(self._prefilled) > self.PREFILL_CACHE_SIZE:
                self._prefilled.popitem(last=False)
        else:
            self._prefilled.move_to_end(key)
            for k, row in state.items():
                self.pool.tensor(k, tuple(row.shape), row.dtype)[slot] = row

    def _run_prefill(self, slot: int, codes: torch.Tensor) -> None:
        rows = _Rows(self.pool, [slot], [0])
        latent = self.decoder.latent(codes.to(self.device, torch.long).T[None], rows)
        # The vocode half starts from zero state on the last frames only: its state after the
        # reference depends on no more than those, so it ends up as after the whole reference.
        self.decoder.vocode(latent[..., -self.vocode_history:], rows)

    @torch.inference_mode()
    def decode(self, slots: list[int], starts: list[int], codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, K] continuing rows ``slots`` at positions ``starts`` → audio [B, T · 1920]."""
        rows = _Rows(self.pool, slots, starts)
        return self.decoder(codes.to(self.device, torch.long).transpose(1, 2), rows)[:, 0]


@dataclass
class _Stream:
    slot: int
    position: int  # frames through the decoder so far (reference + generated)
    pending: list[list[int]] = field(default_factory=list)  # generated, not decoded (= not sent) yet
    emitted: int = 0  # generated frames already sent
    chunks_sent: int = 0
    first_sent_at: float | None = None  # when the first chunk left: the listener's playback clock


class CodecStream:
    """Per-request chunking over one :class:`StreamingDecoder` (the engine's codec stage)."""

    def __init__(self, tokenizer: SpeechTokenizer, chunk_frames: tuple[int, ...], samples_per_frame: int,
                 clock: Callable[[], float] = time.perf_counter, deadline_flush: bool = True) -> None:
        if samples_per_frame != tokenizer.decoder.samples_per_frame:
            raise ValueError(f"the codec makes {tokenizer.decoder.samples_per_frame} samples per frame, "
                             f"not {samples_per_frame}")
        self.tokenizer = tokenizer
        self.chunk_frames = chunk_frames
        self.samples_per_frame = samples_per_frame
        self.frame_seconds = samples_per_frame / tokenizer.cfg.sample_rate
        self.clock, self.deadline_flush = clock, deadline_flush
        self.step_seconds: float | None = None  # moving average of the time between collects (one step)
        self._last_collect: float | None = None
        self.decoder = StreamingDecoder(tokenizer.decoder, tokenizer.device)
        self.streams: dict[str, _Stream] = {}

    def open(self, request_id: str, ref_codes: torch.Tensor | None) -> None:
        """Start a request; ICL requests pass their reference codes [T_ref, 16] as left context."""
        self.close(request_id)
        slot = self.decoder.open()
        ref_frames = 0 if ref_codes is None else ref_codes.shape[0]
        if ref_frames:
            self.decoder.prefill(slot, ref_codes)
        self.streams[request_id] = _Stream(slot=slot, position=ref_frames)

    def close(self, request_id: str) -> None:
        s = self.streams.pop(request_id, None)
        if s is not None:
            self.decoder.close(s.slot)

    def push(self, request_id: str, frame: list[int]) -> None:
        self.streams[request_id].pending.append(frame)

    def _due(self, s: _Stream, final: bool, now: float) -> bool:
        if not s.pending:
            return False
        size = self.chunk_frames[min(s.chunks_sent, len(self.chunk_frames) - 1)]
        if final or len(s.pending) >= size:
            return True
        if not self.deadline_flush or s.first_sent_at is None or self.step_seconds is None \
                or self.step_seconds >= self.frame_seconds:
            return False  # slower than real time, the listener starves anyway: keep chunks cheap
        # Waiting for the full chunk costs (size - pending) more steps, and one more to decode and
        # deliver it: flush now if the listener would run out of audio before that.
        left = s.emitted * self.frame_seconds - (now - s.first_sent_at)
        return left < (size - len(s.pending) + 1) * self.step_seconds

    def _time_step(self, now: float) -> None:
        if self._last_collect is not None:
            dt = now - self._last_collect
            self.step_seconds = dt if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * dt
        self._last_collect = now if self.streams else None  # an idle gap is not a step

    def collect(self, final_ids: set[str]) -> list[Chunk]:
        """Decode and return every due chunk (a request in ``final_ids`` flushes whatever it has).
        Called once per engine step: the interval between calls is the step time it plans with."""
        now = self.clock()
        self._time_step(now)
        due = [rid for rid, s in self.streams.items() if self._due(s, rid in final_ids, now)]
        by_count: dict[int, list[str]] = {}
        for rid in due:
            by_count.setdefault(len(self.streams[rid].pending), []).append(rid)
        audio: dict[str, np.ndarray] = {}
        for rids in by_count.values():
            group = [self.streams[rid] for rid in rids]
            codes = torch.tensor([s.pending for s in group], dtype=torch.long)
            wave = self.decoder.decode([s.slot for s in group], [s.position for s in group], codes)
            wave = wave.float().cpu().numpy()
            for i, (rid, s) in enumerate(zip(rids, group, strict=True)):
                audio[rid] = wave[i]
                s.position += len(s.pending)
        chunks = []
        for rid in due:
            s = self.streams[rid]
            chunks.append(Chunk(rid, audio[rid], s.emitted, len(s.pending)))
            s.emitted += len(s.pending)
            s.chunks_sent += 1
            if s.first_sent_at is None:
                s.first_sent_at = now
            s.pending.clear()
        return chunks
