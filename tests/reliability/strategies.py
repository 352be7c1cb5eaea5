"""Hypothesis strategies for hostile client input: any JSON, message-shaped objects with wild
field values, damaged audio, voice ids with path tricks, malformed WebSocket frames."""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path

import numpy as np
import soundfile as sf
from hypothesis import strategies as st

TYPES = ["start", "speak", "append", "flush", "cancel", "stop"]
MESSAGE_FIELDS = ["voice", "language", "encoding", "sampling", "priority", "max_frames", "non_streaming_text", "id",
                  "text"]
SAMPLING_FIELDS = ["greedy", "seed", "temperature", "top_k", "top_p", "repetition_penalty", "bogus"]
PATH_TRICKS = ["..", "../anna", "../../etc/passwd", "/etc/passwd", "anna/../anna", "./reliable", "reliable/",
               "%2e%2e%2f", "..%2f..%2f", "reliable\x00", "\x00", "RELIABLE", "reliable ", " reliable", "relіable",
               "con", "nul", "..\\..\\windows", "a" * 65, "", "-x", "_x", "reliable;rm -rf /", "~root", "$HOME",
               "reliable\n", "new-voice\n", "*", "?", "reliable/manifest.json", ".tmp-x", ".trash-x"]

leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
json_value = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c,
                                                                                      max_size=4), max_leaves=12)
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
wild = (json_value | surrogates | st.text(min_size=4090, max_size=4200) | st.sampled_from(PATH_TRICKS)
        | st.sampled_from([0, -1, 1, 2**31, 2**63, 1e-300, 1e300, 1e-30, 0.009, 100.1, float("nan"), float("inf")]))
sampling = st.dictionaries(st.sampled_from(SAMPLING_FIELDS), wild, max_size=4)


def _message(kind: str | None = None) -> st.SearchStrategy[dict]:
    kinds = st.just(kind) if kind else st.sampled_from(TYPES) | st.text(max_size=16)
    return st.fixed_dictionaries({"type": kinds}, optional={**{f: wild for f in MESSAGE_FIELDS}, "sampling": sampling})


messages = _message()
starts = _message("start")


def dumps(value: object) -> str:
    """JSON as a sloppy client writes it: NaN and Infinity literals, \\uD800 escapes."""
    return json.dumps(value, allow_nan=True)


def _clip(fmt: str, subtype: str | None = None, seconds: float = 1.0, sr: int = 16000, channels: int = 1) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    wave = np.repeat((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[:, None], channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _silence(fmt: str, seconds: int, sr: int = 8000, channels: int = 1, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, channels, format=fmt, subtype=subtype) as f:
        block = np.zeros((sr, channels), np.float32)
        for _ in range(seconds):
            f.write(block)
    return buf.getvalue()


def _unknown_length_flac() -> bytes:
    data = bytearray(_silence("FLAC", 600))
    total = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)  # STREAMINFO total samples := 0 (unknown)
    data[18:26] = total.to_bytes(8, "big")
    return bytes(data)


def _lying_wav() -> bytes:
    data = bytearray(_clip("WAV"))
    data[40:44] = (2**31 - 2).to_bytes(4, "little")  # the data chunk claims ~2 GiB
    return bytes(data)


CLIPS = [_clip("WAV"), _clip("FLAC"), _clip("OGG", "VORBIS"), _clip("WAV", "FLOAT", channels=2)]


def loud_float_wav(peak: float = 1e30) -> bytes:
    """A valid float WAV whose samples are finite but absurd: it passes decoding, not the voice."""
    buf = io.BytesIO()
    sf.write(buf, (peak * np.sin(np.arange(16000) * 0.05)).astype(np.float32), 16000, format="WAV", subtype="FLOAT")
    return buf.getvalue()

# 50 KB that decodes to 1.4 GB: 29 s of silence in 255 channels at 48 kHz, Ogg Vorbis. Kept as a file
# because encoding it takes 16 s: _silence("OGG", 29, sr=48000, channels=255, subtype="VORBIS").
OGG_255 = Path(__file__).parent / "data" / "ogg-vorbis-255ch-48k-29s-silence.ogg"


@functools.cache
def bombs() -> dict[str, bytes]:
    """Decompression bombs: each is small to send and must be refused before it is decoded."""
    return {"flac_30min_silence": _silence("FLAC", 1800), "ogg_255_channels_29s": OGG_255.read_bytes(),
            "flac_unknown_length_10min": _unknown_length_flac(), "wav_header_claims_2GiB": _lying_wav()}


@st.composite
def damaged_audio(draw) -> bytes:
    clip = draw(st.sampled_from(CLIPS))
    how = draw(st.sampled_from(["truncate", "flip", "random", "empty_tail"]))
    if how == "truncate":
        return clip[:draw(st.integers(0, len(clip)))]
    if how == "flip":
        data = bytearray(clip)
        for _ in range(draw(st.integers(1, 20))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "random":
        return draw(st.binary(min_size=0, max_size=4096))
    return clip[:64] + b"\0" * draw(st.integers(0, 4096))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Raw frames: any opcode, reserved bits, fragmentation, masking and payload.
raw_frames = st.tuples(st.integers(0, 15), st.integers(0, 7), st.booleans(), st.booleans(), st.binary(max_size=200))
