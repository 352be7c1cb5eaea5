"""Offline synthesis: what ``makima-tts synthesize`` does with one request."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.audio import load_audio_24k, write_wav
from engine.model import TTSModel
from engine.prompt import check_request_fits, language_id
from engine.voice import VoicePrompt

MAX_REFERENCE_SECONDS = 60.0


@dataclass
class SynthesisRequest:
    text: str
    out: Path
    ref_audio: Path | None = None
    ref_text: str | None = None
    x_vector_only: bool = False
    language: str = "auto"
    greedy: bool = False
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_frames: int | None = None
    non_streaming_text: bool = False
    codes_out: Path | None = None
    speaker: str | None = None  # CustomVoice
    instruct: str | None = None  # CustomVoice 1.7B, VoiceDesign


def check_request(model: TTSModel, req: SynthesisRequest) -> None:
    """Fail fast on bad input, before any heavy work."""
    if not req.text or not req.text.strip():
        raise ValueError("--text is empty")
    language_id(model.cfg, req.language)
    if req.ref_audio is None and model.info.clones_voices:
        raise ValueError("a reference voice is needed: --ref-audio REF.wav with --ref-text TEXT or --x-vector-only")
    check_request_fits(model.cfg, req.ref_audio is not None, req.speaker, bool(req.instruct))
    if req.ref_audio is not None and not req.x_vector_only and not (req.ref_text and req.ref_text.strip()):
        raise ValueError("ICL voice cloning needs --ref-text (the transcript of --ref-audio), or pass --x-vector-only")
    if req.max_frames is not None and req.max_frames < 1:
        raise ValueError("--max-frames must be >= 1")


def voice_from_reference(model: TTSModel, req: SynthesisRequest) -> VoicePrompt | None:
    if req.ref_audio is None:  # a CustomVoice speaker or a VoiceDesign instruction: nothing to clone
        return None
    audio = load_audio_24k(req.ref_audio, max_seconds=MAX_REFERENCE_SECONDS)
    return model.voice_prompt(audio, req.ref_text, req.x_vector_only)


def run(model: TTSModel, req: SynthesisRequest) -> dict:
    check_request(model, req)
    voice = voice_from_reference(model, req)
    params = model.sampling_from_options(req.greedy, req.seed, req.temperature, req.top_k, req.top_p,
                                         req.repetition_penalty)
    if params.seed is None and not req.greedy:
        # Record the seed we drew so any run can be repeated with --seed.
        params = replace(params, seed=int(torch.seed() % 2**31))
    t0 = time.perf_counter()
    result = model.synthesize(req.text, voice, req.language, params, req.max_frames, req.non_streaming_text,
                              speaker=req.speaker, instruct=req.instruct)
    wall = time.perf_counter() - t0
    write_wav(req.out, result.audio, result.sample_rate)
    if req.codes_out is not None:
        np.save(req.codes_out, result.codes.numpy().astype(np.int64))
    frames = int(result.codes.shape[0])
    gen = result.generation
    return {
        "frames": frames, "audio_seconds": len(result.audio) / result.sample_rate, "stop_reason": result.stop_reason,
        "wall_seconds": wall, "prefill_seconds": gen.prefill_seconds,
        "seconds_per_frame": (gen.talker_seconds + gen.predictor_seconds) / max(frames, 1),
        "decode_seconds": result.decode_seconds, "seed": params.seed,
    }
