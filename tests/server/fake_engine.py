"""A fake engine that keeps the ``TTSEngine`` contract without a model: deterministic PCM per
(text, voice, seed), a configurable delay per chunk, cancellation, and KV-block accounting per
running request so tests can see blocks freed. Tests only; the server never imports it."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator

import numpy as np
import torch

from engine.api import AudioChunk, EngineError, EngineStats, Finished, ModelInfo, Request, StopReason
from engine.audio import AudioError
from engine.voice import VoicePrompt

SAMPLES_PER_FRAME = 1920
PROMPT_ROWS = 10  # what a request "prefills" before its first frame, for the block count


def frames_for(text: str) -> int:
    return max(2, len(text) // 3)


def voice_key(voice: VoicePrompt) -> bytes:
    return voice.speaker_embedding.detach().float().cpu().numpy().tobytes()


def fake_audio(request: Request, frames: int | None = None) -> np.ndarray:
    """Exactly what the fake engine streams for ``request``: a tone whose pitch depends on text,
    voice and seed, so a sample-for-sample comparison catches mixed-up or reordered audio."""
    n = frames if frames is not None else min(frames_for(request.text), request.max_frames or 10**9)
    seed = request.sampling.seed if request.sampling is not None and request.sampling.seed is not None else 0
    h = int.from_bytes(hashlib.sha256(request.text.encode() + voice_key(request.voice) + str(seed).encode())
                       .digest()[:4], "little")
    f0 = 110.0 + h % 700
    t = np.arange(n * SAMPLES_PER_FRAME, dtype=np.float64) / 24000.0
    return (0.4 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * 3 * f0 * t)).astype(np.float32)


class FakeEngine:
    sample_rate = 24000
    languages = ["auto", "chinese", "english", "french", "german", "japanese"]
    model_info = ModelInfo(model_type="base", model_size="fake", speakers=[], takes_instructions=False,
                           clones_voices=True)  # a Base model, as the real engine describes it

    def __init__(self, chunk_delay: float = 0.0, chunk_frames: tuple[int, ...] = (1, 2, 4), num_blocks: int = 512,
                 block_size: int = 16, voice_delay: float = 0.0) -> None:
        self.chunk_delay, self.chunk_frames, self.voice_delay = chunk_delay, chunk_frames, voice_delay
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks: dict[str, int] = {}  # request id → KV blocks held
        self.cancelled: set[str] = set()
        self.submitted: list[Request] = []
        self.frames_generated = 0
        self.voices_made = 0
        self.live: dict[str, tuple[list[str], asyncio.Event]] = {}  # live request id → (text so far, ended)

    def _blocks_for(self, rows: int) -> int:
        return math.ceil(rows / self.block_size)

    async def submit(self, request: Request) -> AsyncIterator[AudioChunk | Finished]:
        rid = request.request_id
        self.submitted.append(request)
        t0 = time.perf_counter()
        if rid in self.blocks:
            raise EngineError("DUPLICATE_ID", rid)
        if request.language not in FakeEngine.languages:  # the class list: a subclass may offer more
            yield Finished(rid, StopReason.ERROR, 0, 0.0, None, 0.0, "unknown language", "INVALID_REQUEST")
            return
        if request.instruct or request.speaker or request.voice is None:  # what a Base model refuses
            yield Finished(rid, StopReason.ERROR, 0, 0.0, None, 0.0, "a Base model clones a voice only",
                           "UNSUPPORTED_BY_MODEL" if request.voice is not None else "VOICE_REQUIRED")
            return
        self.blocks[rid] = self._blocks_for(PROMPT_ROWS)
        done, ttfa, i = 0, None, 0
        try:
            if request.live:  # the audio of the whole text, once it has all come (the real engine starts earlier)
                pieces, ended = self.live[rid] = ([request.text], asyncio.Event())
                try:
                    await ended.wait()
                finally:
                    self.live.pop(rid, None)
                request.text = "".join(pieces)
                if not request.text.strip():
                    yield Finished(rid, StopReason.ERROR, 0, 0.0, None, 0.0, "text is empty", "INVALID_REQUEST")
                    return
            audio = fake_audio(request)
            total = len(audio) // SAMPLES_PER_FRAME
            while done < total:
                await asyncio.sleep(self.chunk_delay)
                if rid in self.cancelled:
                    yield Finished(rid, StopReason.CANCELLED, done, done * SAMPLES_PER_FRAME / 24000, ttfa,
                                   time.perf_counter() - t0)
                    return
                if "FAIL" in request.text and done > 0:
                    yield Finished(rid, StopReason.ERROR, done, 0.0, ttfa, 0.0, "injected failure", "SYNTHESIS_ERROR")
                    return
                n = min(self.chunk_frames[min(i, len(self.chunk_frames) - 1)], total - done)
                i += 1
                self.blocks[rid] = self._blocks_for(PROMPT_ROWS + done + n)
                self.frames_generated += n
                ttfa = ttfa if ttfa is not None else time.perf_counter() - t0
                yield AudioChunk(rid, audio[done * SAMPLES_PER_FRAME:(done + n) * SAMPLES_PER_FRAME], done, n)
                done += n
            reason = StopReason.MAX_FRAMES if request.max_frames and total >= request.max_frames else StopReason.EOS
            yield Finished(rid, reason, done, done * SAMPLES_PER_FRAME / 24000, ttfa, time.perf_counter() - t0)
        finally:
            self.blocks.pop(rid, None)  # finished, cancelled or abandoned: blocks go back at once
            self.cancelled.discard(rid)

    def cancel(self, request_id: str) -> None:
        if request_id in self.blocks:
            self.cancelled.add(request_id)
            self.blocks.pop(request_id, None)
        if request_id in self.live:  # waiting for its text: end the wait, the loop then sees the cancel
            self.live[request_id][1].set()

    def append_text(self, request_id: str, text: str) -> None:
        if request_id in self.live:
            self.live[request_id][0].append(text)

    def end_text(self, request_id: str) -> None:
        if request_id in self.live:
            self.live[request_id][1].set()

    async def make_voice(self, audio_24k: np.ndarray, ref_text: str | None, x_vector_only: bool) -> VoicePrompt:
        if not x_vector_only and not ref_text:
            raise ValueError("ICL voice cloning needs the reference transcript (or use x-vector-only mode)")
        await asyncio.sleep(self.voice_delay)
        self.voices_made += 1
        emb = torch.tensor([float(audio_24k.mean()), float(audio_24k.std()), float(len(audio_24k))])
        if not torch.isfinite(emb).all():  # as the real engine: such audio cannot be a voice
            raise AudioError("INVALID_AUDIO", "the reference audio gives a non-finite speaker embedding")
        if x_vector_only:
            return VoicePrompt(speaker_embedding=emb)
        return VoicePrompt(speaker_embedding=emb, ref_codes=torch.zeros(3, 16, dtype=torch.int64),
                           ref_text_ids=[ord(c) for c in ref_text or ""])

    def stats(self) -> EngineStats:
        running = len(self.blocks)
        return EngineStats(running=running, waiting=0, kv_blocks_used=sum(self.blocks.values()),
                           kv_blocks_total=self.num_blocks, kv_blocks_cached=0,
                           frames_generated=self.frames_generated)
