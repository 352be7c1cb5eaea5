"""Reference-audio I/O: decode any file soundfile reads, mix to mono, resample to 24 kHz.

Mirrors what the official wrapper does before the speaker encoder and the codec encoder
(spec §4.1): float32 samples, mean over channels, then ``librosa.resample``'s default, which is
soxr at 'HQ' quality with the output length fixed to ceil(n * sr_out / sr_in). librosa is not
used; soxr is called the same way, so the samples are identical.

Every failure is an ``AudioError`` with a short machine-readable ``code`` so the server can
turn it into a 4xx response without parsing messages.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 24000
MAX_REFERENCE_SECONDS = 60.0  # longest reference clip the offline CLI accepts (the server has its own limit)

# Declared data sizes at or above this are "length unknown" markers written by streaming
# encoders (0xFFFFFFFF, sox's 0x7FFFF000), not evidence of a cut-off file.
_UNKNOWN_LENGTH = 0x7FFFF000
_DATA_CHUNK_LOG = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class AudioError(ValueError):
    """Reference audio that cannot be used; ``code`` is a stable identifier for API errors."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


_BYTES = (bytes, bytearray, memoryview)


def _describe(source: str | Path | bytes) -> str:
    return f"{len(source)} bytes of audio" if isinstance(source, _BYTES) else str(source)


def _check_not_truncated(f: sf.SoundFile, what: str) -> None:
    # libsndfile reads a WAV whose data chunk was cut short without complaint and just returns
    # fewer frames; its parse log is the only place that says the header promised more.
    m = _DATA_CHUNK_LOG.search(f.extra_info or "")
    if m is None:
        return
    declared, present = int(m.group(1)), int(m.group(2))
    if present + 1 < declared < _UNKNOWN_LENGTH:  # +1: the RIFF pad byte of an odd-sized chunk
        raise AudioError("INVALID_AUDIO", f"{what} is truncated: its header declares {declared} bytes "
                                          f"of audio data but only {present} are present")


def load_audio(source: str | Path | bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode a file path or in-memory file to (float32 mono samples, sample rate).

    Channels are mixed down by their mean, as the official code does. ``max_seconds`` rejects
    long inputs, checked on the decoded length (and, to avoid decoding a huge file, on the
    header's frame count first).
    """
    what = _describe(source)
    if isinstance(source, _BYTES):
        if len(source) == 0:
            raise AudioError("EMPTY_AUDIO", "the audio data is empty (0 bytes)")
        handle: str | BinaryIO = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if not path.exists():
            raise AudioError("AUDIO_NOT_FOUND", f"audio file not found: {path}")
        if not path.is_file():
            raise AudioError("AUDIO_NOT_FOUND", f"not a regular file: {path}")
        if path.stat().st_size == 0:
            raise AudioError("EMPTY_AUDIO", f"audio file is empty (0 bytes): {path}")
        handle = str(path)
    try:
        with sf.SoundFile(handle) as f:
            sr = int(f.samplerate)
            _check_not_truncated(f, what)
            if max_seconds is not None and f.frames > 0:
                _check_duration(f.frames, sr, max_seconds, what)
            data = f.read(dtype="float32", always_2d=True)
    except sf.SoundFileError as e:  # libsndfile's own message says what is wrong with the bytes
        # Its str() starts "Error opening <_io.BytesIO object at 0x...>": keep only libsndfile's reason.
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioError("INVALID_AUDIO", f"cannot decode {what}: {reason}") from e
    except (OSError, RuntimeError) as e:
        raise AudioError("INVALID_AUDIO", f"cannot read {what}: {e}") from e
    if data.shape[0] == 0:
        raise AudioError("EMPTY_AUDIO", f"{what} decodes to no audio samples")
    if max_seconds is not None:
        _check_duration(data.shape[0], sr, max_seconds, what)
    wave = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise AudioError("INVALID_AUDIO", f"{what} contains NaN or infinite samples")
    return np.ascontiguousarray(wave, dtype=np.float32), sr


def _check_duration(frames: int, sr: int, max_seconds: float, what: str) -> None:
    if frames > max_seconds * sr:
        raise AudioError("AUDIO_TOO_LONG", f"{what} is {frames / sr:.2f} s long; "
                                           f"the limit is {max_seconds:g} s")


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample a mono float32 signal exactly as ``librosa.resample`` does by default."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"resample expects a mono 1-D signal, got shape {wave.shape}")
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out:
        return wave
    out = soxr.resample(wave, sr_in, sr_out, quality="HQ")
    # librosa pins the length to ceil(n * ratio), trimming or zero-padding soxr's output.
    n_out = int(math.ceil(wave.shape[0] * (float(sr_out) / sr_in)))
    if out.shape[0] >= n_out:
        out = out[:n_out]
    else:
        out = np.pad(out, (0, n_out - out.shape[0]))
    return np.ascontiguousarray(out, dtype=np.float32)


def load_audio_24k(source: str | Path | bytes, max_seconds: float | None = None) -> np.ndarray:
    """Decode, mix to mono and resample to 24 kHz: the input the speaker and codec encoders take."""
    wave, sr = load_audio(source, max_seconds=max_seconds)
    return resample(wave, sr, SAMPLE_RATE)


def write_wav(path: str | Path | BinaryIO, wave: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """Write mono audio as 32-bit float WAV (no clipping or requantisation of model output)."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"write_wav expects a mono 1-D signal, got shape {wave.shape}")
    sf.write(path, wave, sr, format="WAV", subtype="FLOAT")
