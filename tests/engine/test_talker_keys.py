"""Our networks, built at every release preset, have exactly the official tensor list.

The two Base lists are dumps of the official model; CustomVoice and VoiceDesign are the same
talker without a speaker encoder (the official model builds one for ``tts_model_type`` base only).
"""

import pytest
import torch

from engine.checkpoint import build_on_meta
from engine.models.qwen3_tts import Qwen3TTS
from engine.models.talker import Talker

from .helpers import official_keys, preset_config

RELEASES = [("0.6b-base", "keys_0.6B-Base.txt", True), ("0.6b-custom-voice", "keys_0.6B-Base.txt", False),
            ("1.7b-base", "keys_1.7B-Base.txt", True), ("1.7b-custom-voice", "keys_1.7B-Base.txt", False),
            ("1.7b-voice-design", "keys_1.7B-Base.txt", False)]


def test_talker_keys_and_shapes_equal_official(tmp_path):
    cfg = preset_config("0.6b-base", tmp_path)
    talker = build_on_meta(lambda: Talker(cfg))
    ours = {f"talker.{k}": list(v.shape) for k, v in talker.state_dict().items()}
    theirs = official_keys("keys_0.6B-Base.txt", prefix="talker.")
    assert sorted(set(ours) - set(theirs)) == []
    assert sorted(set(theirs) - set(ours)) == []
    assert ours == theirs
    assert all(p.device == torch.device("meta") for p in talker.parameters())


@pytest.mark.parametrize("preset,key_list,has_speaker_encoder", RELEASES)
def test_every_release_variant_has_the_official_layout(tmp_path, preset, key_list, has_speaker_encoder):
    cfg = preset_config(preset, tmp_path)
    model = build_on_meta(lambda: Qwen3TTS(cfg))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = official_keys(key_list)
    if not has_speaker_encoder:
        theirs = {k: v for k, v in theirs.items() if not k.startswith("speaker_encoder.")}
    assert sorted(set(ours) ^ set(theirs)) == []
    assert ours == theirs


def test_the_1_7b_width_is_read_from_the_config(tmp_path):
    cfg = preset_config("1.7b-base", tmp_path)
    assert cfg.talker.transformer.hidden_size == 2048 and cfg.code_predictor.transformer.hidden_size == 1024
    talker = build_on_meta(lambda: Talker(cfg))
    assert list(talker.code_predictor.small_to_mtp_projection.weight.shape) == [1024, 2048]
    assert list(talker.code_predictor.model.codec_embedding[0].weight.shape) == [2048, 2048]
