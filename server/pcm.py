"""Float samples → bytes on the wire: raw PCM, a streaming WAV header, whole-file encodings."""

from __future__ import annotations

import io
import struct

import numpy as np

# Container formats soundfile (libsndfile) writes, for the buffered OpenAI response formats.
FILE_FORMATS = {"flac": ("FLAC", "PCM_16", "audio/flac"), "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
                "opus": ("OGG", "OPUS", "audio/ogg")}
_UNKNOWN = 0xFFFFFFFF  # "length unknown" in a streamed WAV header; players read to end of stream


def encode_pcm(samples: np.ndarray, encoding: str) -> bytes:
    x = np.asarray(samples, dtype=np.float32)
    if encoding == "pcm_f32le":
        return x.astype("<f4", copy=False).tobytes()
    # Clip, then scale by 32767 and round: symmetric, and ±1.0 maps to ±32767 without wrapping.
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_header(sample_rate: int, encoding: str, data_bytes: int | None = None) -> bytes:
    """A 44-byte RIFF header; with data_bytes None the sizes say "unknown" for streaming."""
    fmt_tag, bits = (3, 32) if encoding == "pcm_f32le" else (1, 16)
    block = bits // 8
    data = _UNKNOWN if data_bytes is None else data_bytes
    riff = _UNKNOWN if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, fmt_tag, 1, sample_rate, sample_rate * block, block, bits) +
            b"data" + struct.pack("<I", data))


def encode_file(samples: np.ndarray, fmt: str, sample_rate: int) -> bytes:
    import soundfile as sf

    container, subtype, _ = FILE_FORMATS[fmt]
    buf = io.BytesIO()
    sf.write(buf, np.asarray(samples, dtype=np.float32), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()
