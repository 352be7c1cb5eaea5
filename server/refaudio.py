"""Bound what reference audio may decode to, from its header, before anything is decoded.

engine.audio checks the duration, but decodes every channel at full rate before mixing down: a
50 KB Ogg Vorbis of 29 s of silence in 255 channels at 48 kHz was measured to decode for 3.8 s
and peak at 1.4 GB of memory. Reference clips are mono or stereo speech, so the channel count and
the decoded sample count (channels x frames) are capped here.
"""

from __future__ import annotations

import io

import soundfile as sf

from server import protocol as P

MAX_CHANNELS = 8  # up to 7.1 is accepted; real reference clips are mono or stereo
SAMPLES_PER_SECOND = 2 * 96_000  # the decoded budget: max_seconds of stereo 96 kHz


def check_decoded_size(audio: bytes, max_seconds: float) -> None:
    """Raise INVALID_AUDIO or AUDIO_TOO_LONG if the header promises too much to decode. A header
    libsndfile cannot read passes: the decoder then reports the problem with its own code."""
    try:
        info = sf.info(io.BytesIO(audio))
    except (sf.SoundFileError, RuntimeError, OSError, ValueError):
        return
    if info.channels > MAX_CHANNELS:
        raise P.ProtocolError(P.INVALID_AUDIO, f"reference audio has {info.channels} channels; at most "
                                               f"{MAX_CHANNELS} are accepted")
    budget = int(max_seconds * SAMPLES_PER_SECOND)
    if info.frames > 0 and info.frames * info.channels > budget:
        raise P.ProtocolError(P.AUDIO_TOO_LONG, f"reference audio decodes to {info.frames * info.channels} samples "
                                                f"({info.channels} channels at {info.samplerate} Hz); the limit is "
                                                f"{budget} ({max_seconds:g} s of stereo 96 kHz)")
