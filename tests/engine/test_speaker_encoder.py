"""Speaker encoder and its mel front end against the official code (fixture written by
tests/fixtures/oracle/make_speaker_fixtures.py in the oracle venv)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.audio import AudioError
from engine.checkpoint import build_on_meta
from engine.config import SpeakerEncoderConfig
from engine.mel import HOP, N_FFT, log_mel_spectrogram, mel_filterbank, min_samples_for_frames
from engine.models.speaker_encoder import SpeakerEncoder

from .helpers import FIXTURES, PRESETS, official_keys

FIXTURE = FIXTURES / "speaker_tiny.safetensors"


def preset_speaker_config(preset: str) -> SpeakerEncoderConfig:
    d = json.loads((PRESETS / preset / "config.json").read_text())
    return SpeakerEncoderConfig.from_dict(d["speaker_encoder_config"])


@pytest.fixture(scope="module")
def fx() -> dict[str, torch.Tensor]:
    with safe_open(str(FIXTURE), framework="pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        out["_config"] = json.loads(f.metadata()["speaker_encoder_config"])
    return out


@pytest.fixture(scope="module")
def tiny(fx) -> SpeakerEncoder:
    enc = SpeakerEncoder(preset_speaker_config("tiny")).eval()
    state = {k.removeprefix("state."): v for k, v in fx.items() if k.startswith("state.")}
    enc.load_state_dict(state, strict=True)
    return enc


def test_keys_and_shapes_equal_official_at_real_size():
    enc = build_on_meta(lambda: SpeakerEncoder(preset_speaker_config("0.6b-base")))
    ours = {f"speaker_encoder.{k}": list(v.shape) for k, v in enc.state_dict().items()}
    theirs = official_keys("keys_0.6B-Base.txt", prefix="speaker_encoder.")
    assert sorted(set(ours) ^ set(theirs)) == []
    assert ours == theirs
    assert all(p.device == torch.device("meta") for p in enc.parameters())


def test_fixture_matches_tiny_preset(fx):
    # A changed tiny preset needs a regenerated fixture, or the strict load below tests nothing.
    d = json.loads((PRESETS / "tiny" / "config.json").read_text())["speaker_encoder_config"]
    assert fx["_config"] == d
    assert d["enc_dim"] == 64


def test_mel_filterbank_equals_librosa(fx):
    ref = np.zeros(128 * 513, dtype=np.float32)
    ref[fx["mel_fb_index"].numpy()] = fx["mel_fb_value"].numpy()
    ours = mel_filterbank()
    assert ours.shape == (128, 513) and ours.dtype == np.float32
    np.testing.assert_allclose(ours.reshape(-1), ref, rtol=1e-6, atol=1e-6)


def float64_log_mel(audio_24k: torch.Tensor) -> torch.Tensor:
    """The official mel_spectrogram's steps (reflect pad, periodic Hann STFT, sqrt(|X|^2 + 1e-9),
    filterbank, clamp, ln) in float64: the value fp32 implementations approximate."""
    pad = (N_FFT - HOP) // 2
    y = F.pad(audio_24k.double()[None, None], (pad, pad), mode="reflect")[0, 0]
    frames = y.unfold(0, N_FFT, HOP) * torch.hann_window(N_FFT, dtype=torch.float64)
    spec = torch.fft.rfft(frames)
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = mag @ torch.from_numpy(mel_filterbank()).double().T
    return torch.log(torch.clamp(mel, min=1e-5))[None]


def fp32_log_mel_error_bound(audio_24k: torch.Tensor) -> torch.Tensor:
    """[1, frames, 128] worst-case |fp32 log-mel - float64 log-mel|, for any correctly rounded fp32
    STFT and GEMM (whatever kernels MKL picks for the CPU: AVX2, AVX-512, AMX). u = 2^-24.

    - Windowing: w_n and w_n * x_n are each rounded once, |delta_n| <= 2u |w_n x_n|, so by
      Parseval the spectrum moves by at most 2u ||X||_2 (||X||_2 = sqrt(N) ||w x||_2).
    - FFT (Higham, Accuracy and Stability of Numerical Algorithms, Thm 24.2): a radix-2
      Cooley-Tukey FFT has ||dX||_2 <= L eta / (1 - L eta) ||X||_2 with L = log2 N stages and
      eta = mu + gamma_4 (sqrt 2 + mu), mu = u the twiddle error; one more stage for the real-input
      post-processing, L = log2 N + 1. That bounds the error's norm over all bins, E = ||dX||_2.
    - |X_k| from re^2 + im^2 + 1e-9 and sqrt: at most 2u |X_k| more (squares, sum, sqrt, to first order).
    - mel_m = sum_k W_mk |X_k| over the row's nnz_m nonzero weights (adding the exact zeros is exact):
      |dmel_m| <= sum_k W_mk |dX_k| + 2u sum_k W_mk |X_k| + gamma_nnz sum_k W_mk |X_k|, with
      gamma_n = n u / (1 - n u), and sum_k W_mk |dX_k| <= ||W_m||_2 E (Cauchy-Schwarz).
    - clamp then ln: |d ln| <= |dmel| / max(mel - |dmel|, 1e-5), plus ln's own rounding (|ln| u + u).
    The bound is loose where a band holds little of its frame's energy (the FFT's error is spread by
    the frame's norm, not the band's): there the fp32 result is least determined, and there the
    AVX-512 and AVX2 kernels disagreed.
    """
    u = 2.0**-24
    pad = (N_FFT - HOP) // 2
    y = F.pad(audio_24k.double()[None, None], (pad, pad), mode="reflect")[0, 0]
    frames = y.unfold(0, N_FFT, HOP) * torch.hann_window(N_FFT, dtype=torch.float64)
    spec = torch.fft.rfft(frames)
    mag = spec.abs()
    norm_x = math.sqrt(N_FFT) * frames.norm(dim=1, keepdim=True)
    stages = math.log2(N_FFT) + 1
    eta = u + 4 * u / (1 - 4 * u) * (math.sqrt(2) + u)
    fft_error = (2 * u + stages * eta / (1 - stages * eta)) * norm_x  # [frames, 1]: E per frame
    w = mel_filterbank()
    nnz = torch.from_numpy((w != 0).sum(axis=1)).double()
    w = torch.from_numpy(w).double()
    mel = torch.sqrt(mag.pow(2) + 1e-9) @ w.T
    d_mel = fft_error * w.norm(dim=1) + 2 * u * (mag @ w.T) + nnz * u / (1 - nnz * u) * mel
    log_mel = torch.log(torch.clamp(mel, min=1e-5))
    return (d_mel / torch.clamp(mel - d_mel, min=1e-5) + u * log_mel.abs() + u)[None]


def test_log_mel_equals_official(fx):
    # Not a fixed atol: fp32 FFT/GEMM results depend on the kernels MKL picks for the CPU (on an
    # AVX-512/AMX Xeon 3 of 9,600 elements differed from this fixture, made on an AVX2 EPYC, by
    # 2.0e-5), so each fp32 result is held to its derived distance from the float64 value, and ours
    # to the official one by the sum of both distances.
    audio = fx["chirp_24k"]
    ours, official = log_mel_spectrogram(audio), fx["chirp_logmel"]
    assert ours.shape == official.shape == (1, (audio.numel() - 256) // 256 + 1, 128)
    exact, bound = float64_log_mel(audio), fp32_log_mel_error_bound(audio)
    assert ((official.double() - exact).abs() <= bound).all()  # the float64 steps are the official ones
    assert ((ours.double() - exact).abs() <= bound).all()
    assert ((ours.double() - official.double()).abs() <= 2 * bound).all()


def test_embedding_equals_official(tiny, fx):
    ours = tiny.embed(fx["chirp_24k"])
    assert ours.shape == (64,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, fx["chirp_embedding"], rtol=0, atol=1e-5)


def test_batched_forward_equals_official(tiny, fx):
    mel = fx["chirp_logmel"]
    batch = torch.cat([mel[:, 0:30], mel[:, 40:70]])
    with torch.inference_mode():
        ours = tiny(batch)
    torch.testing.assert_close(ours, fx["batch_embedding"], rtol=0, atol=1e-5)


def test_too_short_audio_is_a_clear_error(tiny):
    need = min_samples_for_frames(tiny.min_frames)
    assert tiny.embed(torch.zeros(need) + 0.01).shape == (64,)  # the shortest accepted clip works
    with pytest.raises(AudioError, match="at least") as e:
        tiny.embed(torch.zeros(need - 1))
    assert e.value.code == "AUDIO_TOO_SHORT"


def test_embed_casts_to_weight_dtype(fx):
    enc = SpeakerEncoder(preset_speaker_config("tiny")).eval()
    enc.load_state_dict({k.removeprefix("state."): v for k, v in fx.items() if k.startswith("state.")})
    enc = enc.to(torch.bfloat16)
    out = enc.embed(fx["chirp_24k"].to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (64,)
    torch.testing.assert_close(out.float(), fx["chirp_embedding"], rtol=0.1, atol=0.3)
