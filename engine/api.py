"""The engine's public contract, free of HTTP: what a front end submits and what it gets back.

A front end (the aiohttp server, the offline `--requests` runner, benchmarks) builds a
``Request``, calls ``submit`` and iterates the returned stream: ``AudioChunk`` items in order,
then exactly one ``Finished``. ``cancel`` stops a request within one engine step and frees its
KV blocks at once. A live request's text grows with ``append_text`` until ``end_text`` (text
known before the stream is first iterated belongs in ``Request.text``: the request is admitted
then). Voice prompts are opaque values to the front end: it asks the engine to make one from
reference audio, keeps it, and passes it back in requests (``save``/``load`` persist it).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from engine.sampling import SamplingParams
from engine.voice import VoicePrompt


class Priority(enum.IntEnum):
    HIGH = 0
    NORMAL = 1
    LOW = 2


class StopReason(str, enum.Enum):
    EOS = "eos"  # the model ended the utterance
    MAX_FRAMES = "max_frames"  # the frame cap (explicit or derived from the text) was hit
    CANCELLED = "cancelled"
    ERROR = "error"  # an engine failure of this request only


class EngineError(RuntimeError):
    """A request the engine refuses or fails; ``code`` is a stable machine-readable name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    """What to say and in which voice. Which voice fields apply depends on the model variant
    (``ModelInfo``): a Base model needs ``voice`` (a clone), a CustomVoice model a ``speaker``
    (plus an ``instruct`` at 1.7B), a VoiceDesign model an ``instruct``; anything else is refused
    with a coded error that names what the model offers."""

    text: str
    voice: VoicePrompt | None = None
    language: str = "auto"
    sampling: SamplingParams | None = None  # None: the checkpoint's generation_config.json
    priority: Priority = Priority.NORMAL
    max_frames: int | None = None  # None: derived from the text length
    non_streaming_text: bool = False
    request_id: str = ""  # filled by submit when empty
    speaker: str | None = None  # a CustomVoice model's built-in speaker (case-insensitive)
    instruct: str | None = None  # style / voice description; "" is none, as in the official code
    # Live text: ``text`` is what has come so far (may be empty); more follows with ``append_text`` and
    # ``end_text``. The audio equals that of the whole text sent at once; frames wait for text, never guess it.
    live: bool = False

    @property
    def codec_context(self) -> torch.Tensor | None:
        """Codes the codec decodes before the generated ones (an ICL voice's reference), or None."""
        return self.voice.ref_codes if self.voice is not None and self.voice.is_icl else None


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded model offers, for front ends to list (``/api/v1/info``) and check against."""

    model_type: str  # base | custom_voice | voice_design
    model_size: str
    speakers: list[str]  # CustomVoice's built-in speakers, else empty
    takes_instructions: bool
    clones_voices: bool  # Base: reference audio → voice prompt


@dataclass
class AudioChunk:
    request_id: str
    samples: np.ndarray  # float32 mono at the engine's sample_rate, 1920 samples per frame
    first_frame: int
    num_frames: int


@dataclass
class Finished:
    request_id: str
    stop_reason: StopReason
    frames: int
    audio_seconds: float
    ttfa_seconds: float | None  # submit → first chunk ready
    wall_seconds: float
    error: str | None = None
    error_code: str | None = None
    codes: np.ndarray | None = None  # [frames, 16] int64, the generated codes

    @property
    def rtf(self) -> float | None:
        """Real-time factor: wall time over audio time (below 1 is faster than real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int
    frames_generated: int
    extra: dict[str, float] = field(default_factory=dict)
    # Monotonic counters that /metrics exports as ``makima_tts:<key>_total`` (COUNTER_HELP lists them);
    # a key with a ``path`` label is written ``decode_rows{path=static}``.
    counters: dict[str, float] = field(default_factory=dict)


COUNTER_HELP = {
    "engine_steps": "Engine steps run (one talker forward and its frames).",
    "decode_rows": "Talker decode rows, by path: static (the fixed-shape path CUDA replays) or eager.",
    "prefill_rows": "Talker prompt rows prefilled.",
    "host_syncs": "Device-to-host synchronisations made by engine steps.",
    "codec_calls": "Codec decoder passes over generated frames.",
    "codec_frames": "Generated frames decoded by the codec.",
}


class TTSEngine(Protocol):
    """What the server relies on. ``engine.engine.Engine`` implements it."""

    sample_rate: int
    languages: list[str]
    default_sampling: SamplingParams  # what a request without sampling gets
    model_info: ModelInfo

    def submit(self, request: Request) -> AsyncIterator[AudioChunk | Finished]: ...

    def cancel(self, request_id: str) -> None: ...

    def append_text(self, request_id: str, text: str) -> None:
        """More text for a running live request (ignored once it has finished)."""

    def end_text(self, request_id: str) -> None:
        """A live request's text is complete: it ends as the whole text would."""

    async def make_voice(self, audio_24k: np.ndarray, ref_text: str | None, x_vector_only: bool) -> VoicePrompt: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
