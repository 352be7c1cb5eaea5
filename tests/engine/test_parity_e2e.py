"""End-to-end parity with the official qwen-tts 0.1.1 on the tiny random checkpoint.

Golden outputs come from tests/fixtures/oracle/make_e2e_fixtures.py (oracle venv), run on the
checkpoint that `make-random-checkpoint --preset tiny --seed 0` writes; the `tiny_model`
fixture writes the same checkpoint, so a change to the random generator shows up here.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.generate import Trace
from engine.voice import VoicePrompt

from .helpers import FIXTURES

GOLDEN = FIXTURES / "e2e_tiny.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, json.loads(meta["cases"]), meta["ref_text"]


@pytest.fixture(scope="module")
def voices(tiny_model, golden):
    tensors, _, ref_text = golden
    ref = tensors["ref_wave"].numpy()
    return {"icl": tiny_model.voice_prompt(ref, ref_text), "xvec": tiny_model.voice_prompt(ref, x_vector_only=True)}


def test_speaker_embedding_matches(voices, golden):
    tensors, _, _ = golden
    diff = (voices["icl"].speaker_embedding - tensors["speaker_embedding"]).abs().max().item()
    assert diff <= 1e-5, diff


def test_reference_codes_identical(voices, golden):
    tensors, _, _ = golden
    assert torch.equal(voices["icl"].ref_codes, tensors["ref_codes"])


def _golden_voice(tensors, tiny_model, mode, ref_text) -> VoicePrompt:
    """The oracle's own voice prompt, so each case isolates the generation path."""
    if mode == "xvec":
        return VoicePrompt(speaker_embedding=tensors["speaker_embedding"])
    return VoicePrompt(speaker_embedding=tensors["speaker_embedding"], ref_codes=tensors["ref_codes"],
                       ref_text_ids=tiny_model.tokenizer.ref_ids(ref_text))


def test_greedy_codes_identical_for_every_case(tiny_model, golden):
    tensors, cases, ref_text = golden
    assert len(cases) == 16
    for name, case in cases.items():
        voice = _golden_voice(tensors, tiny_model, case["mode"], ref_text)
        out = tiny_model.synthesize(case["text"], voice, case["language"], tiny_model.sampling(greedy=True),
                                    max_frames=case["frames"], non_streaming_text=case["non_streaming_text"])
        assert torch.equal(out.codes, tensors[f"{name}.codes"]), name
        if f"{name}.wave" in tensors:
            expected = tensors[f"{name}.wave"].numpy()
            assert out.audio.shape == expected.shape, name
            assert np.abs(out.audio - expected).max() <= 1e-5, name


@pytest.mark.parametrize("name", ["icl_english_stream_short", "xvec_auto_stream_long"])
def test_prefill_and_every_logit_match(tiny_model, golden, name):
    from engine.generate import generate_codes
    from engine.prompt import build_prompt

    tensors, cases, ref_text = golden
    case = cases[name]
    voice = _golden_voice(tensors, tiny_model, case["mode"], ref_text)
    text_ids = tiny_model.tokenizer.target_ids(case["text"])
    prompt = build_prompt(tiny_model.tts.talker, tiny_model.cfg, tiny_model.tokenizer.role_ids(), text_ids, voice,
                          case["language"], case["non_streaming_text"])
    assert (prompt.prefill - tensors[f"{name}.prefill"]).abs().max() <= 1e-5
    assert (prompt.trailing - tensors[f"{name}.trailing"]).abs().max() <= 1e-5
    trace = Trace()
    generate_codes(tiny_model.tts.talker, prompt, tiny_model.sampling(greedy=True), case["frames"], trace)
    talker = torch.stack(trace.talker_logits)
    expected = tensors[f"{name}.talker_logits"]
    # At the frame cap the official loop samples one more codebook-0 id that it then drops; we
    # stop before computing it.
    assert talker.shape[0] in (expected.shape[0], expected.shape[0] - 1)
    assert (talker - expected[: talker.shape[0]]).abs().max() <= 1e-5
    predictor = torch.stack(trace.predictor_logits)
    expected = tensors[f"{name}.predictor_logits"]
    assert predictor.shape == expected.shape
    assert (predictor - expected).abs().max() <= 1e-5


def test_seeded_sampling_matches_official_draw_for_draw(tiny_model, golden):
    tensors, cases, ref_text = golden
    case = cases["icl_english_stream_short"]
    voice = _golden_voice(tensors, tiny_model, "icl", ref_text)
    expected = tensors["sampled.codes"]
    out = tiny_model.synthesize(case["text"], voice, "english", tiny_model.sampling(seed=7),
                                max_frames=expected.shape[0])
    assert torch.equal(out.codes, expected)


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_model, golden):
    tensors, _, ref_text = golden
    voice = _golden_voice(tensors, tiny_model, "xvec", ref_text)

    def run(seed):
        return tiny_model.synthesize("Seeded run.", voice, "auto", tiny_model.sampling(seed=seed), max_frames=12).codes

    first, second, other = run(123), run(123), run(124)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
