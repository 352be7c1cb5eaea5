"""Frames → PCM chunks per request, on the chunk schedule (small first chunks, larger later).

Every request gets exactly 1920 samples per frame, equal to a full decode of its codes. For ICL
requests the reference codes are the decoder's left context, exactly as the offline path decodes
``reference + generated`` and drops the reference part.

This version decodes a request's whole code history (reference + generated so far) whenever a
chunk is due and slices off the new samples. That is exact by construction; its cost grows with
the utterance length (a stateful streaming decoder is the planned replacement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.models.speech_tokenizer import SpeechTokenizer


@dataclass
class _Stream:
    ref_frames: int
    codes: list[list[int]] = field(default_factory=list)  # reference + generated
    emitted: int = 0  # generated frames already sent
    chunks_sent: int = 0


@dataclass
class Chunk:
    request_id: str
    samples: np.ndarray
    first_frame: int
    num_frames: int


class CodecStream:
    def __init__(self, tokenizer: SpeechTokenizer, chunk_frames: tuple[int, ...], samples_per_frame: int) -> None:
        self.tokenizer = tokenizer
        self.chunk_frames = chunk_frames
        self.samples_per_frame = samples_per_frame
        self.streams: dict[str, _Stream] = {}

    def open(self, request_id: str, ref_codes: torch.Tensor | None) -> None:
        codes = [] if ref_codes is None else ref_codes.tolist()
        self.streams[request_id] = _Stream(ref_frames=len(codes), codes=codes)

    def close(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    def push(self, request_id: str, frame: list[int]) -> None:
        self.streams[request_id].codes.append(frame)

    def _due(self, s: _Stream, final: bool) -> bool:
        pending = len(s.codes) - s.ref_frames - s.emitted
        size = self.chunk_frames[min(s.chunks_sent, len(self.chunk_frames) - 1)]
        return pending > 0 and (final or pending >= size)

    @torch.inference_mode()
    def collect(self, final_ids: set[str]) -> list[Chunk]:
        """Decode every due chunk (a request in ``final_ids`` flushes whatever it has)."""
        due = [rid for rid, s in self.streams.items() if self._due(s, rid in final_ids)]
        chunks = []
        for rid in due:
            s = self.streams[rid]
            codes = torch.tensor(s.codes, dtype=torch.long, device=self.tokenizer.device)
            wave = self.tokenizer.decode(codes)
            start = (s.ref_frames + s.emitted) * self.samples_per_frame
            new_frames = len(s.codes) - s.ref_frames - s.emitted
            samples = wave[start:start + new_frames * self.samples_per_frame].float().cpu().numpy()
            chunks.append(Chunk(rid, samples, s.emitted, new_frames))
            s.emitted += new_frames
            s.chunks_sent += 1
        return chunks
