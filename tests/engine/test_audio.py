"""Reference-audio loading: formats, mix-down, resampling parity with librosa, and the errors
a server must turn into clear 4xx responses."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file

from engine.audio import AudioError, load_audio, load_audio_24k, resample, write_wav

from .helpers import FIXTURES


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    return load_file(str(FIXTURES / "speaker_tiny.safetensors"))


def wav_bytes(wave: np.ndarray, sr: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def noise(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    x = 0.1 * np.random.default_rng(seed).standard_normal((int(seconds * sr), channels)).astype(np.float32)
    return x[:, 0] if channels == 1 else x


# --- parity with the official wrapper (librosa.load + mean, librosa.resample soxr_hq) ---

@pytest.mark.parametrize("name,sr", [("stereo_44k", 44100), ("mono_16k", 16000)])
def test_wav_to_24k_equals_official(fx, tmp_path, name, sr):
    path = tmp_path / f"{name}.wav"
    sf.write(path, fx[f"{name}_pcm16"], sr, subtype="PCM_16")
    ours = load_audio_24k(path)
    ref = fx[f"{name}_official_24k"]
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(load_audio_24k(path.read_bytes()), ref, rtol=0, atol=1e-5)


def test_resample_length_and_identity():
    x = noise(0.1, 44100)
    assert np.array_equal(resample(x, 24000, 24000), x)
    for sr_in in (8000, 16000, 22050, 44100, 48000):
        n = 1234
        assert resample(x[:n], sr_in, 24000).shape == (int(np.ceil(n * 24000 / sr_in)),)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((10, 2), np.float32), 16000, 24000)


# --- formats and mix-down ---

def test_stereo_is_mixed_down_by_mean():
    x = noise(0.2, 24000, channels=3)
    wave, sr = load_audio(wav_bytes(x, 24000, subtype="FLOAT"))
    assert sr == 24000 and wave.dtype == np.float32 and wave.ndim == 1
    np.testing.assert_allclose(wave, x.mean(axis=1), rtol=0, atol=1e-7)


@pytest.mark.parametrize("fmt,subtype,rel", [("FLAC", "PCM_16", 1e-3), ("OGG", "VORBIS", 0.5),
                                              ("WAV", "PCM_24", 1e-5)])
def test_other_formats_decode(fmt, subtype, rel):
    x = noise(0.3, 16000)
    wave, sr = load_audio(wav_bytes(x, 16000, subtype=subtype, fmt=fmt))
    assert sr == 16000 and wave.shape == x.shape
    # Relative RMS error: quantisation for PCM, a loose bound for lossy Vorbis on white noise.
    assert np.sqrt(np.mean((wave - x) ** 2) / np.mean(x**2)) < rel


def test_write_wav_is_float32_mono(tmp_path):
    x = noise(0.2, 24000)
    write_wav(tmp_path / "out.wav", x)
    info = sf.info(tmp_path / "out.wav")
    assert (info.samplerate, info.channels, info.subtype, info.format) == (24000, 1, "FLOAT", "WAV")
    wave, sr = load_audio(tmp_path / "out.wav")
    assert sr == 24000 and np.array_equal(wave, x)
    with pytest.raises(ValueError, match="mono"):
        write_wav(tmp_path / "bad.wav", np.zeros((10, 2), np.float32))


# --- errors ---

def expect(code: str, match: str, source, **kw) -> None:
    with pytest.raises(AudioError, match=match) as e:
        load_audio_24k(source, **kw)
    assert e.value.code == code
    assert isinstance(e.value, ValueError)


def test_missing_file(tmp_path):
    expect("AUDIO_NOT_FOUND", "not found", tmp_path / "nope.wav")
    expect("AUDIO_NOT_FOUND", "not a regular file", tmp_path)


def test_garbage(tmp_path):
    junk = b"this is not audio at all " * 40
    expect("INVALID_AUDIO", "cannot decode", junk)
    (tmp_path / "junk.wav").write_bytes(junk)
    expect("INVALID_AUDIO", "cannot decode", tmp_path / "junk.wav")


def test_truncated_wav(tmp_path):
    data = wav_bytes(noise(0.5, 24000), 24000)
    expect("INVALID_AUDIO", "truncated", data[: len(data) // 2])  # cut inside the samples
    expect("INVALID_AUDIO", "cannot decode", data[:30])  # cut inside the header
    (tmp_path / "cut.wav").write_bytes(data[:-1001])
    expect("INVALID_AUDIO", "truncated", tmp_path / "cut.wav")


def test_truncated_flac():
    data = wav_bytes(noise(0.5, 24000), 24000, fmt="FLAC")
    expect("INVALID_AUDIO", "cannot decode", data[: len(data) // 2])


def test_empty(tmp_path):
    expect("EMPTY_AUDIO", "empty", b"")
    (tmp_path / "empty.wav").write_bytes(b"")
    expect("EMPTY_AUDIO", "empty", tmp_path / "empty.wav")
    expect("EMPTY_AUDIO", "no audio samples", wav_bytes(np.zeros(0, np.float32), 24000))


def test_non_finite_samples():
    x = noise(0.1, 24000)
    x[100] = np.nan
    expect("INVALID_AUDIO", "NaN or infinite", wav_bytes(x, 24000, subtype="FLOAT"))
    x[100] = np.inf
    expect("INVALID_AUDIO", "NaN or infinite", wav_bytes(x, 24000, subtype="FLOAT"))


def test_duration_cap(tmp_path):
    data = wav_bytes(noise(2.0, 16000), 16000)
    expect("AUDIO_TOO_LONG", r"2\.00 s long; the limit is 1\.5 s", data, max_seconds=1.5)
    (tmp_path / "long.wav").write_bytes(data)
    expect("AUDIO_TOO_LONG", "limit", tmp_path / "long.wav", max_seconds=1.5)
    assert load_audio_24k(data, max_seconds=2.0).shape == (48000,)  # the cap itself is allowed
