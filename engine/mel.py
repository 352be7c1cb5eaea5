"""Log-mel front end of the speaker encoder (spec §1.4), without librosa.

The official ``mel_spectrogram`` takes its filterbank from ``librosa.filters.mel`` (slaney mel
scale, slaney area normalisation) and its STFT from ``torch.stft``. The filterbank is rebuilt
here with the same float64 numpy arithmetic, in the same order, so it matches librosa to the
last bit or two; the STFT path uses the same torch calls as the official function.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 24000
N_FFT = 1024
HOP = 256
WIN = 1024
N_MELS = 128
FMIN = 0.0
FMAX = 12000.0

# Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log = hz >= _MIN_LOG_HZ
    return np.where(log, _MIN_LOG_MEL + np.log(np.where(log, hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    hz = _F_SP * mel
    log = mel >= _MIN_LOG_MEL
    return np.where(log, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), hz)


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                   fmin: float = FMIN, fmax: float | None = FMAX) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] float32 triangles, = ``librosa.filters.mel`` with its defaults
    (htk=False, norm='slaney')."""
    fmax = sr / 2 if fmax is None else fmax
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sr)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(np.float64(fmin)), hz_to_mel(np.float64(fmax)), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    # librosa stores the triangles in a float32 array before scaling; round at the same point.
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2:] - mel_f[:-2])  # slaney: constant energy per band
    return (weights * enorm[:, None]).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _mel_basis(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(mel_filterbank()).to(device)


@functools.lru_cache(maxsize=8)
def _hann(device: torch.device) -> torch.Tensor:
    return torch.hann_window(WIN, device=device)  # periodic, as the official code uses


def min_samples_for_frames(frames: int) -> int:
    """Shortest signal whose log-mel has at least ``frames`` frames (reflect padding also needs
    more samples than the pad width)."""
    return max(frames * HOP, (N_FFT - HOP) // 2 + 1)


def log_mel_spectrogram(audio_24k: torch.Tensor) -> torch.Tensor:
    """[n] 24 kHz mono samples → [1, frames, 128] log-mel, frames = (n - 256) // 256 + 1.

    Always computed in fp32 (the official code computes the mel from a float32 numpy array
    and only then casts to the model dtype).
    """
    if audio_24k.ndim != 1:
        raise ValueError(f"log_mel_spectrogram expects a 1-D signal, got shape {tuple(audio_24k.shape)}")
    pad = (N_FFT - HOP) // 2
    if audio_24k.shape[0] <= pad:
        raise ValueError(f"signal too short for the mel front end: {audio_24k.shape[0]} samples, "
                         f"need at least {min_samples_for_frames(1)}")
    y = audio_24k.float()
    y = F.pad(y[None, None], (pad, pad), mode="reflect")[0]
    spec = torch.stft(y, N_FFT, hop_length=HOP, win_length=WIN, window=_hann(y.device), center=False,
                      normalized=False, onesided=True, return_complex=True)
    # The 1e-9 keeps sqrt's gradient finite in training; kept for bit-level parity.
    mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    mel = torch.matmul(_mel_basis(y.device), mag)
    return torch.log(torch.clamp(mel, min=1e-5)).transpose(1, 2)
