"""The wire protocol: error codes, client messages parsed and validated, server messages built.

Everything a client can get wrong is caught here and becomes a ``ProtocolError`` with a stable
code, so the session handler only ever sees well-formed values. docs/protocol.md is the
user-facing description; keep the two in step.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from engine.api import Priority
from engine.sampling import SamplingParams

# ---- error codes ------------------------------------------------------------------------------
INVALID_MESSAGE = "INVALID_MESSAGE"  # not JSON, wrong shape or type, out-of-order message
UNSUPPORTED = "UNSUPPORTED"  # well-formed but not offered: unknown type, encoding, language, format
VOICE_NOT_FOUND = "VOICE_NOT_FOUND"
INVALID_AUDIO = "INVALID_AUDIO"  # bad base64, undecodable, empty or non-finite reference audio
AUDIO_TOO_LARGE = "AUDIO_TOO_LARGE"  # more bytes than max_upload_bytes
AUDIO_TOO_LONG = "AUDIO_TOO_LONG"  # decodes to more than max_ref_seconds
TEXT_TOO_LONG = "TEXT_TOO_LONG"
OVERLOADED = "OVERLOADED"  # too many sessions or queued utterances; retry later
UNAUTHORIZED = "UNAUTHORIZED"  # missing or wrong token
FORBIDDEN = "FORBIDDEN"  # Origin not allowed
TTS_UNAVAILABLE = "TTS_UNAVAILABLE"  # model not loaded (yet), failed to load, or server draining
SYNTHESIS_ERROR = "SYNTHESIS_ERROR"  # the engine failed this utterance only
INVALID_VOICE_ID = "INVALID_VOICE_ID"
VOICE_EXISTS = "VOICE_EXISTS"
IDLE_TIMEOUT = "IDLE_TIMEOUT"
RATE_LIMITED = "RATE_LIMITED"  # this token's concurrent sessions or message rate is over its limit
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"  # the voice store holds its limit of voices or bytes
BODY_TOO_LARGE = "BODY_TOO_LARGE"  # an HTTP request body over its total cap

HTTP_STATUS = {
    INVALID_MESSAGE: 400, UNSUPPORTED: 400, VOICE_NOT_FOUND: 404, INVALID_AUDIO: 400, AUDIO_TOO_LARGE: 413,
    AUDIO_TOO_LONG: 400, TEXT_TOO_LONG: 400, OVERLOADED: 503, UNAUTHORIZED: 401, FORBIDDEN: 403,
    TTS_UNAVAILABLE: 503, SYNTHESIS_ERROR: 500, INVALID_VOICE_ID: 400, VOICE_EXISTS: 409, RATE_LIMITED: 429,
    QUOTA_EXCEEDED: 507, BODY_TOO_LARGE: 413,
}

# engine.audio.AudioError codes → ours (the file-path ones cannot happen for uploads).
AUDIO_ERROR_CODES = {"AUDIO_TOO_LONG": AUDIO_TOO_LONG}
# engine Finished.error_code / EngineError.code → ours; anything else is SYNTHESIS_ERROR.
ENGINE_ERROR_CODES = {"TEXT_TOO_LONG": TEXT_TOO_LONG, "INVALID_REQUEST": INVALID_MESSAGE,
                      "OVERLOADED": OVERLOADED, "TTS_UNAVAILABLE": TTS_UNAVAILABLE,
                      # what the loaded model variant cannot serve (a speaker to Base, an instruction to 0.6B)
                      "UNSUPPORTED_BY_MODEL": UNSUPPORTED, "UNKNOWN_SPEAKER": VOICE_NOT_FOUND,
                      "VOICE_REQUIRED": VOICE_NOT_FOUND}

ENCODINGS = ("pcm_s16le", "pcm_f32le")
PRIORITIES = {"low": Priority.LOW, "normal": Priority.NORMAL, "high": Priority.HIGH}
# Ids are looked up, never joined into paths. \Z, not $: $ also matches before a trailing newline.
VOICE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\Z")
MAX_ID_CHARS = 128
# Sampling ranges. Values outside them make the engine's logits inf/NaN (temperature 1e-300 or 1e308,
# repetition_penalty 1e-300 were measured to fail a whole engine step, or kill the engine thread),
# so they are refused here; the ranges are far wider than any useful setting.
TEMPERATURE_RANGE = (0.01, 100.0)
REPETITION_PENALTY_RANGE = (0.01, 100.0)
MAX_TOP_K = 2**31 - 1


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, id: str | int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.id = code, message, id


# ---- client messages --------------------------------------------------------------------------
@dataclass
class VoiceSpec:
    name: str | None = None  # a registered voice; otherwise inline reference audio
    ref_audio: bytes | None = None
    ref_text: str | None = None
    x_vector_only: bool = False


@dataclass
class SamplingSpec:
    greedy: bool = False
    seed: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def params(self, defaults: SamplingParams) -> SamplingParams | None:
        """None when nothing is overridden: the engine then uses the checkpoint's defaults."""
        if self == SamplingSpec():
            return None
        return defaults.with_user_options(self.greedy, self.seed, self.temperature, self.top_k, self.top_p,
                                          self.repetition_penalty)  # as `makima-tts synthesize` does


@dataclass
class Start:
    voice: VoiceSpec | None = None  # None: the server's default voice
    language: str = "auto"
    encoding: str = "pcm_s16le"
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    priority: Priority = Priority.NORMAL
    max_frames: int | None = None
    non_streaming_text: bool = False
    instruct: str | None = None  # CustomVoice 1.7B style / VoiceDesign voice description


@dataclass
class Speak:
    id: str | int | None
    text: str
    live: bool = False  # the text goes on with append and ends with end (one utterance)


@dataclass
class Append:
    text: str
    seq: int | None = None  # when given, the server acknowledges the append with it


@dataclass
class End:
    seq: int | None = None


@dataclass
class Flush:
    pass


@dataclass
class Cancel:
    pass


@dataclass
class Stop:
    pass


ClientMessage = Start | Speak | Append | End | Flush | Cancel | Stop


def _check_keys(msg: dict, allowed: set[str], what: str, id: str | int | None = None) -> None:
    # Strict on purpose: a misspelt option ("temprature") is an error, not silently ignored.
    unknown = sorted(set(msg) - allowed)
    if unknown:
        raise ProtocolError(INVALID_MESSAGE, f"{what}: unknown field(s) {', '.join(unknown)}", id)


def _get(msg: dict, key: str, kinds: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    if key not in msg or msg[key] is None:
        return default
    value = msg[key]
    # bool is an int in Python; a JSON true is never a valid number here.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        names = "/".join(k.__name__ for k in _as_tuple(kinds))
        raise ProtocolError(INVALID_MESSAGE, f"{what}.{key} must be {names}, got {json.dumps(value)[:40]}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def decode_base64_audio(data: str, max_bytes: int) -> bytes:
    """Base64 (or a data: URL) → bytes, size-checked before decoding."""
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if not head.endswith(";base64"):
            raise ProtocolError(INVALID_AUDIO, "ref_audio data URL must be base64-encoded")
    if len(data) * 3 // 4 > max_bytes:
        raise ProtocolError(AUDIO_TOO_LARGE, f"ref_audio is over the {max_bytes} byte limit")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(INVALID_AUDIO, f"ref_audio is not valid base64: {e}") from e
    if not raw:
        raise ProtocolError(INVALID_AUDIO, "ref_audio is empty")
    return raw


# ISO 639-1 codes of the languages Qwen3-TTS names in its config; a code is accepted wherever a name is.
LANGUAGE_CODES = {"zh": "chinese", "en": "english", "fr": "french", "de": "german", "it": "italian",
                  "ja": "japanese", "ko": "korean", "pt": "portuguese", "ru": "russian", "es": "spanish"}


def language_name(value: str) -> str:
    """A client's language (``English``, ``en``, ``EN``, empty for auto) → the model's name (``english``)."""
    name = value.strip().lower() or "auto"
    return LANGUAGE_CODES.get(name, name)


def parse_voice(value: Any, max_audio_bytes: int) -> VoiceSpec | None:
    if value is None:
        return None
    if isinstance(value, str):
        # Ids are lower case ("Anna" over HTTP or WebSocket is anna); so are CustomVoice speakers ("Ryan").
        value = value.strip().lower()
        if not VOICE_ID.match(value):
            raise ProtocolError(VOICE_NOT_FOUND, f"no voice named {value[:64]!r} (ids are [a-z0-9_-], max 64)")
        return VoiceSpec(name=value)
    if not isinstance(value, dict):
        raise ProtocolError(INVALID_MESSAGE, "voice must be a name or {ref_audio, ref_text, x_vector_only}")
    _check_keys(value, {"ref_audio", "ref_text", "x_vector_only"}, "voice")
    audio = _get(value, "ref_audio", str, "voice")
    if audio is None:
        raise ProtocolError(INVALID_MESSAGE, "voice.ref_audio (base64 audio) is required")
    ref_text = _get(value, "ref_text", str, "voice")
    if ref_text is not None:
        check_unicode(ref_text, "voice.ref_text")
    x_vector_only = _get(value, "x_vector_only", bool, "voice", False)
    if not x_vector_only and not (ref_text and ref_text.strip()):
        raise ProtocolError(INVALID_MESSAGE, "voice.ref_text (the transcript) is required unless x_vector_only")
    if x_vector_only:
        ref_text = None
    return VoiceSpec(ref_audio=decode_base64_audio(audio, max_audio_bytes), ref_text=ref_text,
                     x_vector_only=x_vector_only)


def parse_sampling(value: Any) -> SamplingSpec:
    if value is None:
        return SamplingSpec()
    if not isinstance(value, dict):
        raise ProtocolError(INVALID_MESSAGE, "sampling must be an object")
    _check_keys(value, {"greedy", "seed", "temperature", "top_k", "top_p", "repetition_penalty"}, "sampling")
    s = SamplingSpec(greedy=_get(value, "greedy", bool, "sampling", False), seed=_get(value, "seed", int, "sampling"),
                     temperature=_num(value, "temperature"), top_k=_get(value, "top_k", int, "sampling"),
                     top_p=_num(value, "top_p"), repetition_penalty=_num(value, "repetition_penalty"))
    # Written as "not lo <= x <= hi" so that NaN, which compares false with everything, is refused.
    lo, hi = TEMPERATURE_RANGE
    if s.temperature is not None and not lo <= s.temperature <= hi:
        raise ProtocolError(INVALID_MESSAGE, f"sampling.temperature must be in [{lo:g}, {hi:g}]")
    if s.top_k is not None and not 0 <= s.top_k <= MAX_TOP_K:
        raise ProtocolError(INVALID_MESSAGE, "sampling.top_k must be >= 0 (0 disables it) and fit in 32 bits")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise ProtocolError(INVALID_MESSAGE, "sampling.top_p must be in (0, 1]")
    lo, hi = REPETITION_PENALTY_RANGE
    if s.repetition_penalty is not None and not lo <= s.repetition_penalty <= hi:
        raise ProtocolError(INVALID_MESSAGE, f"sampling.repetition_penalty must be in [{lo:g}, {hi:g}]")
    if s.seed is not None and not 0 <= s.seed < 2**63:
        raise ProtocolError(INVALID_MESSAGE, "sampling.seed must be in [0, 2^63)")
    return s


def _num(msg: dict, key: str) -> float | None:
    v = _get(msg, key, (int, float), "sampling")
    return None if v is None else as_float(v, f"sampling.{key}")


def as_float(value: int | float, what: str) -> float:
    """A JSON number as a float, or a coded error: JSON integers are unbounded, and float() raises
    OverflowError on one of 309+ digits (it closed the socket with no error frame)."""
    try:
        return float(value)
    except OverflowError as e:
        raise ProtocolError(INVALID_MESSAGE, f"{what} is out of range") from e


def _parse_start(msg: dict, max_audio_bytes: int) -> Start:
    _check_keys(msg, {"type", "voice", "language", "encoding", "sampling", "priority", "max_frames",
                      "non_streaming_text", "instruct"}, "start")
    instruct = _get(msg, "instruct", str, "start")
    if instruct is not None:
        check_unicode(instruct, "start.instruct")
    encoding = _get(msg, "encoding", str, "start", "pcm_s16le")
    if encoding not in ENCODINGS:
        raise ProtocolError(UNSUPPORTED, f"encoding {encoding[:32]!r} is not offered; use {' or '.join(ENCODINGS)}")
    priority = _get(msg, "priority", str, "start", "normal")
    if priority not in PRIORITIES:
        raise ProtocolError(INVALID_MESSAGE, "start.priority must be low, normal or high")
    max_frames = _get(msg, "max_frames", int, "start")
    if max_frames is not None and max_frames < 1:
        raise ProtocolError(INVALID_MESSAGE, "start.max_frames must be >= 1")
    return Start(voice=parse_voice(msg.get("voice"), max_audio_bytes),
                 language=language_name(_get(msg, "language", str, "start", "auto")),
                 encoding=encoding, sampling=parse_sampling(msg.get("sampling")), priority=PRIORITIES[priority],
                 max_frames=max_frames, non_streaming_text=_get(msg, "non_streaming_text", bool, "start", False),
                 instruct=instruct)


def check_unicode(text: str, what: str, id: str | int | None = None) -> str:
    """JSON's \\uD800 escapes decode to lone surrogates, which are not text: the tokenizer raises
    TypeError on them (measured: it killed the engine thread). Refuse them at the door."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProtocolError(INVALID_MESSAGE, f"{what} is not valid Unicode (a lone surrogate at {e.start})", id) from e
    return text


def check_text(text: str, max_chars: int, id: str | int | None = None) -> str:
    check_unicode(text, "text", id)
    if not text.strip():
        raise ProtocolError(INVALID_MESSAGE, "text is empty", id)
    if len(text) > max_chars:
        raise ProtocolError(TEXT_TOO_LONG, f"text is {len(text)} characters; the limit is {max_chars}", id)
    return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(raw: str | bytes) -> Any:
    """Strict JSON: Python's json also accepts NaN and Infinity, which would slip past every range check
    (NaN compares false) into the engine. 1e400 still parses, as inf, and the range checks refuse it."""
    return json.loads(raw, parse_constant=_no_constant)


def parse_message(raw: str, max_text_chars: int, max_audio_bytes: int) -> ClientMessage:
    """One client text frame → a message, or ProtocolError."""
    try:
        msg = loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError, and so is NaN below
        raise ProtocolError(INVALID_MESSAGE, f"not valid JSON: {e}") from e
    if not isinstance(msg, dict):
        raise ProtocolError(INVALID_MESSAGE, "a message must be a JSON object with a \"type\"")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(INVALID_MESSAGE, "a message must have a string \"type\"")
    if kind == "start":
        return _parse_start(msg, max_audio_bytes)
    if kind == "speak":
        id = msg.get("id")
        if id is not None and (isinstance(id, bool) or not isinstance(id, (str, int)) or len(str(id)) > MAX_ID_CHARS):
            raise ProtocolError(INVALID_MESSAGE, f"speak.id must be a string or integer, at most {MAX_ID_CHARS} chars")
        _check_keys(msg, {"type", "id", "text", "live"}, "speak", id)
        live = _get(msg, "live", bool, "speak", False)
        text = msg.get("text", "" if live else None)
        if not isinstance(text, str):
            raise ProtocolError(INVALID_MESSAGE, "speak.text must be a string", id)
        if live:  # may start empty: the text comes with append
            if len(text) > max_text_chars:
                raise ProtocolError(TEXT_TOO_LONG, f"text is {len(text)} characters; the limit is {max_text_chars}", id)
            return Speak(id=id, text=check_unicode(text, "speak.text", id), live=True)
        return Speak(id=id, text=check_text(text, max_text_chars, id))
    if kind == "append":
        _check_keys(msg, {"type", "text", "seq"}, "append")
        text = msg.get("text")
        if not isinstance(text, str):
            raise ProtocolError(INVALID_MESSAGE, "append.text must be a string")
        return Append(text=check_unicode(text, "append.text"), seq=_get(msg, "seq", int, "append"))
    if kind == "end":
        _check_keys(msg, {"type", "seq"}, "end")
        return End(seq=_get(msg, "seq", int, "end"))
    simple = {"flush": Flush, "cancel": Cancel, "stop": Stop}
    if kind in simple:
        _check_keys(msg, {"type"}, kind)
        return simple[kind]()
    raise ProtocolError(UNSUPPORTED, f"unknown message type {kind[:32]!r}")


# ---- server messages --------------------------------------------------------------------------
def error(code: str, message: str, id: str | int | None = None) -> dict:
    out: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if id is not None:
        out["id"] = id
    return out


def ack(event: str, seq: int, id: str | int | None) -> dict:
    """A live utterance's append or end, taken: a client may pace its text on these."""
    return {"type": "ack", "event": event, "seq": seq, "id": id}


def ready(session_id: str, sample_rate: int, encoding: str, voice: str | None, language: str) -> dict:
    return {"type": "ready", "session_id": session_id, "sample_rate": sample_rate, "encoding": encoding,
            "channels": 1, "voice": voice, "language": language}


def complete(id: str | int | None, frames: int, audio_ms: float, ttfa_ms: float | None, wall_ms: float,
             stop_reason: str) -> dict:
    return {"type": "complete", "id": id, "frames": frames, "audio_ms": round(audio_ms, 1),
            "ttfa_ms": None if ttfa_ms is None else round(ttfa_ms, 1), "wall_ms": round(wall_ms, 1),
            "rtf": round(wall_ms / audio_ms, 4) if audio_ms > 0 else None, "stop_reason": stop_reason}
