"""One utterance through the engine, shared by the WebSocket and the HTTP routes: iterate its
audio with a guaranteed cancel, and keep the numbers every route reports and exports."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from engine.api import AudioChunk, Finished, Request, StopReason, TTSEngine
from server import protocol as P
from server.metrics import Metrics
from server.watch import EngineWatch

utterance_log = logging.getLogger("makima.server.utterance")


async def stream_audio(engine: TTSEngine, request: Request,
                       watch: EngineWatch | None = None) -> AsyncIterator[AudioChunk | Finished]:
    """The engine's stream, except that leaving early in any way (cancellation, an exception in the
    consumer, aclose) cancels the request at once instead of whenever the generator is collected.
    ``watch`` sees how long each item takes to come. Use it under ``contextlib.aclosing``."""
    stream = engine.submit(request)
    finished = False
    try:
        while not finished:
            got = False
            if watch is not None:
                watch.wait_begins()
            try:
                item = await stream.__anext__()
                got = True
            except StopAsyncIteration:
                return
            finally:
                if watch is not None:
                    watch.wait_ends(got)
            finished = isinstance(item, Finished)
            yield item
    finally:
        if not finished:
            engine.cancel(request.request_id)
            with contextlib.suppress(Exception):
                await stream.aclose()


class Tracker:
    """Timing and size of one utterance, from its turn to its end; feeds the metrics and writes the
    utterance's one log line (``makima.server.utterance``: id, voice, frames, TTFA, RTF, stop reason)."""

    def __init__(self, metrics: Metrics, sample_rate: int, request_id: str = "", voice: str | None = None) -> None:
        self.metrics, self.sample_rate = metrics, sample_rate
        self.request_id, self.voice = request_id, voice
        self.t0 = time.perf_counter()
        self.first_at: float | None = None
        self.samples = 0

    def _log(self, outcome: str, frames: int | None = None, stop: str | None = None) -> None:
        wall = time.perf_counter() - self.t0
        ttfa = "-" if self.first_at is None else f"{(self.first_at - self.t0) * 1000:.0f}"
        rtf = f"{wall / self.audio_s:.3f}" if self.audio_s else "-"
        # key=value with no spaces in values (the voice is an id, or "inline"): one grep or logfmt parse away.
        utterance_log.info("utterance id=%s voice=%s outcome=%s frames=%s audio_s=%.2f ttfa_ms=%s rtf=%s stop=%s",
                           self.request_id or "-", self.voice or "inline", outcome,
                           "-" if frames is None else frames, self.audio_s, ttfa, rtf, stop or "-")

    def sent(self, chunk: AudioChunk) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
            self.metrics.ttfa.observe(self.first_at - self.t0)
        self.samples += len(chunk.samples)

    @property
    def audio_s(self) -> float:
        return self.samples / self.sample_rate

    def error(self, f: Finished) -> P.ProtocolError:
        self.metrics.requests.labels("error").inc()
        self._log("error", f.frames, f.error_code or f.stop_reason.value)
        return P.ProtocolError(P.ENGINE_ERROR_CODES.get(f.error_code or "", P.SYNTHESIS_ERROR),
                               f.error or "synthesis failed")

    def done(self, f: Finished, id: str | int | None = None) -> dict:
        """Record a successful utterance; return its ``complete`` message."""
        wall = time.perf_counter() - self.t0
        m = self.metrics
        m.requests.labels("ok").inc()
        m.e2e.observe(wall)
        m.audio_seconds.inc(self.audio_s)
        if self.audio_s > 0:
            m.rtf.observe(wall / self.audio_s)
        ttfa = None if self.first_at is None else (self.first_at - self.t0) * 1000
        self._log("ok", f.frames, f.stop_reason.value)
        return P.complete(id, f.frames, self.audio_s * 1000, ttfa, wall * 1000, f.stop_reason.value)

    def abandoned(self, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()
        self._log(outcome)


def failed(f: Finished) -> bool:
    return f.stop_reason == StopReason.ERROR
