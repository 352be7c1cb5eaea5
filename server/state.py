"""What every route shares: the engine (once loaded), settings, voices, metrics, drain state,
and the two steps every synthesis route takes: resolve a voice, build an engine Request."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from engine.api import EngineStats, ModelInfo, Request, TTSEngine
from engine.sampling import SamplingParams
from engine.voice import VoicePrompt
from server import protocol as P
from server.limits import Limits
from server.metrics import Metrics
from server.settings import ServerSettings
from server.voices import VoiceRegistry
from server.watch import EngineWatch

log = logging.getLogger("makima.server")

# OpenAI's built-in voice names: clients such as OpenWebUI send one of these; unless registered,
# they map to --default-voice, or to the built-in voice when none is configured.
OPENAI_VOICES = frozenset({"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
                           "verse", "marin", "cedar"})


# The built-in voice's name in replies: not a valid voice id, so no registered voice can shadow it.
BUILTIN_VOICE = "_builtin"
BUILTIN_VOICE_DIR = Path(__file__).parent / "default_voice"


@functools.cache
def _builtin_voice_files() -> tuple[bytes, str]:
    return (BUILTIN_VOICE_DIR / "ref.wav").read_bytes(), (BUILTIN_VOICE_DIR / "ref_text.txt").read_text().strip()


@dataclass
class AppState:
    settings: ServerSettings
    voices: VoiceRegistry
    engine: TTSEngine | None = None
    load_error: str | None = None
    load_progress: str = "starting"
    draining: bool = False
    metrics: Metrics = field(init=False)
    sessions: set = field(default_factory=set)  # open speak.Session objects, started or not (max_connections)
    active: int = 0  # sessions + HTTP speech requests holding a slot (max_sessions)
    limits: Limits = field(init=False)
    watch: EngineWatch = field(default_factory=EngineWatch)
    background: set = field(default_factory=set)  # fire-and-forget tasks (drain's closes), kept from GC

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.engine_stats)
        self.limits = Limits(self.settings)

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def engine_stats(self) -> EngineStats | None:
        if self.engine is None:
            return None
        try:
            return self.engine.stats()
        except Exception:  # a scrape must never fail because the engine is in trouble
            log.exception("engine.stats() failed")
            return None

    def require_engine(self) -> TTSEngine:
        if self.engine is None:
            why = self.load_error or f"the model is still loading ({self.load_progress})"
            raise P.ProtocolError(P.TTS_UNAVAILABLE, why)
        if self.draining:
            raise P.ProtocolError(P.TTS_UNAVAILABLE, "the server is shutting down; reconnect to another replica")
        return self.engine

    def acquire_slot(self, key: str | None = None) -> None:
        """Take a session slot, counted against the server and against ``key`` (the client's token)."""
        if self.active >= self.settings.max_sessions:
            raise P.ProtocolError(P.OVERLOADED, f"the server is at its limit of {self.settings.max_sessions} "
                                                "sessions; retry shortly")
        self.limits.open(key)
        self.active += 1
        self.metrics.sessions.set(self.active)

    def release_slot(self, key: str | None = None) -> None:
        self.limits.close(key)
        self.active -= 1
        self.metrics.sessions.set(self.active)

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` without waiting for it, holding a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    @property
    def sampling_defaults(self) -> SamplingParams:
        # The engine's checkpoint defaults when it exposes them; the dataclass defaults equal the
        # published generation_config.json otherwise.
        return getattr(self.engine, "default_sampling", None) or SamplingParams()

    def check_language(self, language: str) -> str:
        langs = self.engine.languages if self.engine is not None else ["auto"]
        if language not in langs:
            raise P.ProtocolError(P.UNSUPPORTED, f"language {language[:32]!r} is not offered; use one of "
                                                 f"{', '.join(langs)}")
        return language

    async def voice_prompt(self, spec: P.VoiceSpec | None) -> tuple[VoicePrompt | None, str | None]:
        """A voice spec (or None: the default voice) → (voice prompt, voice name or None if inline).
        On a model that clones no voice (CustomVoice, VoiceDesign) the prompt is None and the name
        is a built-in speaker (or None); ``request`` passes it on as ``Request.speaker``."""
        engine = self.require_engine()
        info = getattr(engine, "model_info", None)
        if info is not None and not info.clones_voices:
            return None, self._speaker(info, spec)
        if spec is None:
            if not self.settings.default_voice:
                return await self.builtin_voice(engine), BUILTIN_VOICE
            spec = P.VoiceSpec(name=self.settings.default_voice)
        if spec.name is not None:
            name = spec.name
            if self.voices.info(name) is None and name in OPENAI_VOICES:
                if not self.settings.default_voice:
                    return await self.builtin_voice(engine), BUILTIN_VOICE
                name = self.settings.default_voice
            return await self.voices.prompt(name), name
        assert spec.ref_audio is not None
        prompt = await self.voices.inline_prompt(engine, spec.ref_audio, spec.ref_text, spec.x_vector_only,
                                                 self.settings.max_ref_seconds)
        return prompt, None

    async def builtin_voice(self, engine: TTSEngine) -> VoicePrompt:
        """The voice shipped in server/default_voice/ (see its MANIFEST.md), prepared once and cached."""
        audio, transcript = _builtin_voice_files()
        return await self.voices.inline_prompt(engine, audio, transcript, False, self.settings.max_ref_seconds)

    def _speaker(self, info: ModelInfo, spec: P.VoiceSpec | None) -> str | None:
        """The built-in speaker a request on a CustomVoice model speaks as (None on VoiceDesign).
        OpenAI's voice names, and no name, stand for the default voice when it is a speaker."""
        offer = (f"choose a speaker: {', '.join(info.speakers)}" if info.speakers
                 else "this VoiceDesign model has no speakers; describe the voice in the instruction")
        if spec is not None and spec.ref_audio is not None:
            raise P.ProtocolError(P.UNSUPPORTED, f"this model clones no voice; {offer}")
        asked = spec.name if spec is not None else None
        name = asked
        if name is None or (name in OPENAI_VOICES and name not in info.speakers):
            name = self.settings.default_voice if self.settings.default_voice in info.speakers else None
        if not info.speakers:
            if name is not None:
                raise P.ProtocolError(P.UNSUPPORTED, f"no speaker {name!r}: {offer}")
            return None
        if name is None or name not in info.speakers:
            said = f"no speaker {(name or asked)!r}" if (name or asked) else "no voice given"
            raise P.ProtocolError(P.VOICE_NOT_FOUND, f"{said}; {offer}")
        return name

    def request(self, text: str, voice: VoicePrompt | None, start: P.Start, request_id: str,
                speaker: str | None = None) -> Request:
        return Request(text=text, voice=voice, language=start.language,
                       sampling=start.sampling.params(self.sampling_defaults), priority=start.priority,
                       max_frames=start.max_frames, non_streaming_text=start.non_streaming_text,
                       request_id=request_id, speaker=speaker, instruct=start.instruct)


STATE: web.AppKey[AppState] = web.AppKey("makima_state", AppState)


def get_state(request: web.Request) -> AppState:
    return request.app[STATE]


def in_flight(state: AppState) -> int:
    """Utterances being spoken or queued, plus HTTP speech requests (slots not held by a socket)."""
    busy = sum(1 for s in state.sessions if s.busy)
    return busy + state.active - sum(1 for s in state.sessions if s.holds_slot)
