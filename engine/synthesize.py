"""Offline synthesis: what ``makima-tts synthesize`` does with one request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.audio import MAX_REFERENCE_SECONDS, load_audio_24k, write_wav
from engine.config import ModelConfig
from engine.model import TTSModel
from engine.prompt import check_request_fits, language_id


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


def check_request(cfg: ModelConfig, req: SynthesisRequest) -> None:
    """Fail fast on bad input, before any heavy work: everything here needs only the checkpoint's
    config files, so ``makima-tts synthesize`` runs it before loading the weights."""
    if not req.text or not req.text.strip():
        raise ValueError("--text is empty")
    language_id(cfg, req.language)
    if req.ref_audio is None and cfg.model_type == "base":
        raise ValueError("a reference voice is needed: --ref-audio REF.wav with --ref-text TEXT or --x-vector-only")
    check_request_fits(cfg, req.ref_audio is not None, req.speaker, bool(req.instruct))
    if req.ref_audio is not None and not req.x_vector_only and not (req.ref_text and req.ref_text.strip()):
        raise ValueError("ICL voice cloning needs --ref-text (the transcript of --ref-audio), or pass --x-vector-only")
    if req.max_frames is not None and req.max_frames < 1:
        raise ValueError("--max-frames must be >= 1")
    cfg.generation.sampling.with_user_options(req.greedy, req.seed, req.temperature, req.top_k, req.top_p,
                                              req.repetition_penalty).validate()
    for flag, path in (("--out", req.out), ("--codes-out", req.codes_out)):
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{flag} {path}: the directory {path.parent} does not exist")


def load_reference(req: SynthesisRequest) -> np.ndarray | None:
    """--ref-audio decoded to 24 kHz mono (an AudioError names the file when it cannot be read); None
    without one (a CustomVoice speaker or a VoiceDesign instruction: nothing to clone)."""
    if req.ref_audio is None:
        return None
    return load_audio_24k(req.ref_audio, max_seconds=MAX_REFERENCE_SECONDS)


def run(model: TTSModel, req: SynthesisRequest, reference: np.ndarray | None = None,
        on_frame: Callable[[int], None] | None = None) -> dict:
    """``reference``: --ref-audio already decoded (the CLI reads it before loading the model);
    ``on_frame(n)`` after each generated frame."""
    check_request(model.cfg, req)
    audio = load_reference(req) if reference is None else reference
    voice = None if audio is None else model.voice_prompt(audio, req.ref_text, req.x_vector_only)
    params = model.sampling_from_options(req.greedy, req.seed, req.temperature, req.top_k, req.top_p,
                                         req.repetition_penalty)
    if params.seed is None and not req.greedy:
        # Record the seed we drew so any run can be repeated with --seed.
        params = replace(params, seed=int(torch.seed() % 2**31))
    t0 = time.perf_counter()
    result = model.synthesize(req.text, voice, req.language, params, req.max_frames, req.non_streaming_text,
                              speaker=req.speaker, instruct=req.instruct, on_frame=on_frame)
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
