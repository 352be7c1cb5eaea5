"""Speaker encoder and its mel front end against the official code (fixture written by
tests/fixtures/oracle/make_speaker_fixtures.py in the oracle venv)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.audio import AudioError
from engine.checkpoint import build_on_meta
from engine.config import SpeakerEncoderConfig
from engine.mel import log_mel_spectrogram, mel_filterbank, min_samples_for_frames
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


def test_log_mel_equals_official(fx):
    ours = log_mel_spectrogram(fx["chirp_24k"])
    ref = fx["chirp_logmel"]
    assert ours.shape == ref.shape == (1, (fx["chirp_24k"].numel() - 256) // 256 + 1, 128)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


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
