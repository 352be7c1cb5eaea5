"""12 Hz speech tokenizer (codec encoder + decoder) against the official code.

The fixture is written by tests/fixtures/oracle/make_codec_fixtures.py in the oracle venv. Its
weights are not stored (1.9 MB even at tiny size): they are regenerated here by the same
seeded function and checked against the SHA-256 the oracle recorded.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from engine.checkpoint import build_on_meta
from engine.config import SpeechTokenizerConfig
from engine.models.speech_tokenizer import SpeechTokenizer

from .helpers import FIXTURES, PRESETS, official_keys

FIXTURE = FIXTURES / "codec_tiny.safetensors"
SPF = 1920  # samples per frame
TOL = 1e-5


def preset_tokenizer_config(preset: str) -> SpeechTokenizerConfig:
    path = PRESETS / preset / "speech_tokenizer_config.json"
    return SpeechTokenizerConfig.from_dict(json.loads(path.read_text()))


def _oracle_script():
    """The fixture script, for its weight recipe only (its oracle imports live in main())."""
    spec = importlib.util.spec_from_file_location("make_codec_fixtures",
                                                  FIXTURES / "oracle" / "make_codec_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fx() -> dict:
    with safe_open(str(FIXTURE), framework="pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        out["_meta"] = f.metadata()
    return out


@pytest.fixture(scope="module")
def tiny(fx) -> SpeechTokenizer:
    model = SpeechTokenizer(preset_tokenizer_config("tiny")).eval()
    script = _oracle_script()
    state = script.random_state({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                seed=int(fx["_meta"]["seed"]))
    # Same weights as the oracle had, or every comparison below is meaningless.
    assert script.state_sha256(state) == fx["_meta"]["state_sha256"]
    model.load_state_dict(state, strict=True)
    return model


def test_keys_and_shapes_equal_official_at_real_size():
    model = build_on_meta(lambda: SpeechTokenizer(preset_tokenizer_config("0.6b-base")))
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = list(official_keys("keys_tokenizer_12hz.txt").items())
    assert len(theirs) == 496
    assert sorted(set(dict(ours)) ^ set(dict(theirs))) == []
    assert ours == theirs  # same shapes, same order
    assert all(t.device == torch.device("meta") for t in model.state_dict().values())


def test_fixture_matches_tiny_preset(fx):
    # A changed tiny preset needs a regenerated fixture (the SHA check in `tiny` would fail too).
    assert json.loads(fx["_meta"]["speech_tokenizer_config"]) == json.loads(
        (PRESETS / "tiny" / "speech_tokenizer_config.json").read_text())


def test_encode_gives_official_codes(tiny, fx):
    codes = tiny.encode(fx["wave"])
    assert codes.dtype == torch.long
    assert codes.shape == (-(-fx["wave"].numel() // SPF), 16) == (17, 16)
    assert torch.equal(codes, fx["codes"].long())


def test_encode_batch_matches_official_batch(tiny, fx):
    short_len = int(fx["_meta"]["short_len"])
    full, short = tiny.encode_batch([fx["wave"], fx["wave"][:short_len]])
    assert torch.equal(full, fx["codes"].long())
    assert short.shape == (-(-short_len // SPF), 16)
    assert torch.equal(short, fx["batch_codes_short"].long())


def test_decode_of_encoded_codes(tiny, fx):
    audio = tiny.decode(fx["codes"].long())
    assert audio.dtype == torch.float32 and audio.shape == (17 * SPF,)
    assert (audio - fx["decode_codes"]).abs().max().item() <= TOL


def test_decode_long_uses_official_chunking(tiny, fx):
    codes = fx["long_codes"].long()
    audio = tiny.decode(codes)
    assert audio.shape == (codes.shape[0] * SPF,)
    stride = int(fx["_meta"]["long_stride"])
    lo, hi = json.loads(fx["_meta"]["long_window"])
    assert (audio[::stride] - fx["decode_long_strided"]).abs().max().item() <= TOL
    assert (audio[lo * SPF: hi * SPF] - fx["decode_long_window"]).abs().max().item() <= TOL


def test_chunked_decode_parameters_match_official(tiny, fx):
    # At tiny size the default 25-frame context hides the seams; a 3-frame context does not.
    p = json.loads(fx["_meta"]["chunked"])
    codes = fx["long_codes"].long()[: p["frames"]]
    audio = tiny.decode(codes, chunk_size=p["chunk_size"], left_context=p["left_context"])
    assert audio.shape == (p["frames"] * SPF,)
    assert (audio[:: p["stride"]] - fx["decode_chunked_strided"]).abs().max().item() <= TOL
    single = tiny.decode(codes, chunk_size=p["frames"])
    assert (audio - single).abs().max().item() > 1e-2  # the seams are really there


def test_decode_batch_rows_equal_single_decodes(tiny, fx):
    a, b = fx["codes"].long(), fx["long_codes"].long()[:40]
    out = tiny.decode_batch([a, b, b[:0]])
    assert [o.shape[0] for o in out] == [17 * SPF, 40 * SPF, 0]
    assert (out[0] - tiny.decode(a)).abs().max().item() <= TOL  # batched GEMMs round differently
    assert (out[1] - tiny.decode(b)).abs().max().item() <= TOL


def test_lengths_are_exact_multiples_of_a_frame(tiny):
    for n in (1, SPF - 1, SPF, SPF + 1, 5 * SPF + 7):
        codes = tiny.encode(torch.randn(n) * 0.1)
        assert codes.shape == (-(-n // SPF), 16)
        assert tiny.decode(codes).shape == (codes.shape[0] * SPF,)
    assert tiny.encode(torch.zeros(0)).shape == (0, 16)
    assert tiny.decode(torch.zeros(0, 16, dtype=torch.long)).shape == (0,)


def test_decoder_is_causal(tiny, fx):
    # Changing frame t must leave every sample before frame t untouched (streaming relies on it).
    codes = fx["long_codes"].long()[:30]
    changed = codes.clone()
    changed[20] = (changed[20] + 1) % 64
    a, b = tiny.decode(codes), tiny.decode(changed)
    assert torch.equal(a[: 20 * SPF], b[: 20 * SPF])
    assert not torch.equal(a[20 * SPF:], b[20 * SPF:])
