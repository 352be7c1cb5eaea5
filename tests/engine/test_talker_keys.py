"""Our talker, built at the real 0.6B-Base config, has exactly the official tensor list."""

import torch

from engine.checkpoint import build_on_meta
from engine.models.talker import Talker

from .helpers import official_keys, preset_config


def test_talker_keys_and_shapes_equal_official(tmp_path):
    cfg = preset_config("0.6b-base", tmp_path)
    talker = build_on_meta(lambda: Talker(cfg))
    ours = {f"talker.{k}": list(v.shape) for k, v in talker.state_dict().items()}
    theirs = official_keys("keys_0.6B-Base.txt", prefix="talker.")
    assert sorted(set(ours) - set(theirs)) == []
    assert sorted(set(theirs) - set(ours)) == []
    assert ours == theirs
    assert all(p.device == torch.device("meta") for p in talker.parameters())
