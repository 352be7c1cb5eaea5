"""Frames → PCM chunks per stream: decoded in lockstep every step, sent on the chunk schedule.

Decoding and sending are separate decisions. Every :meth:`CodecStream.collect` (once per engine
step) advances each stream that has a new frame by exactly that frame, all streams in one
fixed-shape call of the :class:`engine.codec_lockstep.LockstepDecoder`; the PCM accumulates per
stream. The chunk schedule (small first chunks, larger later) and the deadline flush then decide
only when a stream's accumulated PCM is sent. So a step costs one decoder call whatever the
streams' chunk phases, and that call has a shape CUDA can replay.

Per-stream decoder state lives in a pool sized for ``capacity`` streams (the engine's
``max_running``) at start. A stream takes its row at its first frame (a request that is admitted
but still waiting holds none) and gives it back after its last; a stream that finds every row
taken is refused with ``OVERLOADED`` (:meth:`CodecStream.take_failures`), the pool never grows.
A preempted request keeps its row (its audio state is not recomputed), so rows can run out only
when a request of higher priority is admitted while preempted ones wait with theirs.

ICL requests: the reference codes are run through the decoder once per distinct reference (an
LRU cache of the resulting state rows), on a separate prefill thread started by :meth:`open`, so
it never delays the other streams' frames; the stream joins the lockstep when its state is ready
(normally long before: the talker's prefill of the same request takes at least a step). A stream
whose prefill is late keeps its frames queued and catches up in the step its state is ready (a few
extra calls for that stream alone); a final flush waits for the prefill. The offline path's
"decode reference + generated, cut the reference part" is what this reproduces. The transformer
sees the whole reference; the convolutional half only the last few frames its state can depend on
(:func:`engine.codec_lockstep.vocode_history_frames`), which gives the same state for a fraction
of the cost.

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

import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.api import EngineError
from engine.codec_lockstep import LockstepDecoder, StateRows
from engine.models.speech_tokenizer import SpeechTokenizer


@dataclass
class Chunk:
    request_id: str
    samples: np.ndarray
    first_frame: int
    num_frames: int


@dataclass
class _Stream:
    position: int  # frames through the decoder so far (reference + generated)
    prefill: Future[StateRows] | None  # the reference's state (ICL), maybe still being computed
    slot: int | None = None  # its pool row, from its first decoded frame until its last
    pending: list[list[int]] = field(default_factory=list)  # generated, not decoded yet
    decoded: list[np.ndarray] = field(default_factory=list)  # PCM of decoded frames not sent yet
    emitted: int = 0  # generated frames already sent
    chunks_sent: int = 0
    first_sent_at: float | None = None  # when the first chunk left: the listener's playback clock

    @property
    def ready(self) -> bool:
        return self.prefill is None or self.prefill.done()


class CodecStream:
    """Per-request chunking over one :class:`LockstepDecoder` (the engine's codec stage). Every method
    runs on one thread (the engine's codec worker) except the reference prefills, on their own."""

    # Reference states kept per distinct reference (a registered voice is reused by many requests):
    # a cached prefill is a row copy instead of a decoder pass.
    PREFILL_CACHE_SIZE = 32

    def __init__(self, tokenizer: SpeechTokenizer, chunk_frames: tuple[int, ...], samples_per_frame: int,
                 clock: Callable[[], float] = time.perf_counter, deadline_flush: bool = True,
                 capacity: int = 64, cuda_graphs: bool = True) -> None:
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
        self.decoder = LockstepDecoder(tokenizer.decoder, tokenizer.device, capacity, cuda_graphs)
        self.streams: dict[str, _Stream] = {}
        self._prefilled: OrderedDict[bytes, Future[StateRows]] = OrderedDict()
        self._prefill_worker = ThreadPoolExecutor(1, thread_name_prefix="makima-codec-prefill")
        self._refused: set[str] = set()  # streams that failed here: their frames are dropped until close
        self._failures: list[tuple[str, str, str]] = []  # (request id, error code, message) not yet reported
        self.calls = 0  # lockstep decoder calls (each one frame for every stream in it)
        self.frames_decoded = 0

    def open(self, request_id: str, ref_codes: torch.Tensor | None) -> None:
        """Start a request; ICL requests pass their reference codes [T_ref, 16] as left context."""
        self.close(request_id)
        ref_frames = 0 if ref_codes is None else ref_codes.shape[0]
        prefill = self._prefill(ref_codes) if ref_frames else None
        self.streams[request_id] = _Stream(position=ref_frames, prefill=prefill)

    def _prefill(self, codes: torch.Tensor) -> Future[StateRows]:
        key = codes.to("cpu", torch.long).numpy().tobytes() + bytes(str(tuple(codes.shape)), "ascii")
        future = self._prefilled.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._prefilled[key] = self._prefill_worker.submit(self.decoder.prefill, codes)
            if len(self._prefilled) > self.PREFILL_CACHE_SIZE:
                self._prefilled.popitem(last=False)
        self._prefilled.move_to_end(key)
        return future

    def close(self, request_id: str) -> None:
        self._refused.discard(request_id)
        s = self.streams.pop(request_id, None)
        if s is not None and s.slot is not None:
            self.decoder.pool.release(s.slot)

    def push(self, request_id: str, frame: list[int]) -> None:
        if request_id not in self._refused:  # a refused stream's frames go nowhere until it is closed
            self.streams[request_id].pending.append(frame)

    def take_failures(self) -> list[tuple[str, str, str]]:
        """Streams that failed here since the last call, as (request id, error code, message): no state
        row was free (OVERLOADED) or the reference prefill raised (SYNTHESIS_ERROR). The engine fails
        those requests; the others in the same step are not affected."""
        failures, self._failures = self._failures, []
        return failures

    def shutdown(self) -> None:
        self._prefill_worker.shutdown(wait=True)

    def _due(self, s: _Stream, final: bool, now: float) -> bool:
        if not s.decoded:
            return False
        size = self.chunk_frames[min(s.chunks_sent, len(self.chunk_frames) - 1)]
        if final or len(s.decoded) >= size:
            return True
        if not self.deadline_flush or s.first_sent_at is None or self.step_seconds is None \
                or self.step_seconds >= self.frame_seconds:
            return False  # slower than real time, the listener starves anyway: keep chunks cheap
        # Waiting for the full chunk costs (size - decoded) more steps, and one more to decode and
        # deliver it: flush now if the listener would run out of audio before that.
        left = s.emitted * self.frame_seconds - (now - s.first_sent_at)
        return left < (size - len(s.decoded) + 1) * self.step_seconds

    def _time_step(self, now: float) -> None:
        if self._last_collect is not None:
            dt = now - self._last_collect
            self.step_seconds = dt if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * dt
        self._last_collect = now if self.streams else None  # an idle gap is not a step

    def _decodable(self, rid: str, s: _Stream, final: bool) -> bool:
        """Whether ``s`` takes part in this call: it has a frame, its reference state is ready (a final
        stream waits for it) and it holds a row (taken now, or refused when none is free)."""
        if not s.pending or rid in self._refused:
            return False
        if not s.ready and not final:
            return False
        if s.slot is None:
            try:
                s.slot = self.decoder.pool.acquire(None if s.prefill is None else s.prefill.result())
            except Exception as e:  # this stream fails, the step goes on for the others
                code = e.code if isinstance(e, EngineError) else "SYNTHESIS_ERROR"
                self._refused.add(rid)
                self._failures.append((rid, code, f"codec: {e}"))
                s.pending.clear()
                return False
        return True

    def _decode_once(self, rids: list[str]) -> None:
        """One lockstep call: each of ``rids`` advances by its oldest pending frame."""
        group = [self.streams[rid] for rid in rids]
        audio = self.decoder.step([s.slot for s in group], [s.position for s in group],
                                  [s.pending[0] for s in group])
        for i, s in enumerate(group):
            s.decoded.append(audio[i].copy())
            s.pending.pop(0)
            s.position += 1
        self.calls += 1
        self.frames_decoded += len(group)

    def collect(self, final_ids: set[str]) -> list[Chunk]:
        """Decode every stream's new frame in one call, then return every due chunk (a request in
        ``final_ids`` flushes whatever it has). Called once per engine step: the interval between
        calls is the step time it plans with.

        The engine pushes one frame per stream per step, so one call serves them all. A stream with
        more (its reference prefill finished late, or a caller pushed several) catches up here, in
        one more call per extra frame that only the streams still behind take part in.
        """
        now = self.clock()
        self._time_step(now)
        rids = [rid for rid, s in self.streams.items() if self._decodable(rid, s, rid in final_ids)]
        while rids:
            self._decode_once(rids)
            rids = [rid for rid in rids if self.streams[rid].pending]
        chunks = []
        for rid, s in self.streams.items():
            final = rid in final_ids
            if not self._due(s, final, now):
                continue
            chunks.append(Chunk(rid, np.concatenate(s.decoded), s.emitted, len(s.decoded)))
            s.emitted += len(s.decoded)
            s.chunks_sent += 1
            if s.first_sent_at is None:
                s.first_sent_at = now
            s.decoded.clear()
        for rid in final_ids:  # its last frame is out: the row is free for the next stream
            s = self.streams.get(rid)
            if s is not None and s.slot is not None and not s.pending and not s.decoded:
                self.decoder.pool.release(s.slot)
                s.slot = None
        return chunks
