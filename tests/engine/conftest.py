"""Engine test fixtures: one tiny random checkpoint per session, in the real layout."""

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    # seed 0: the checkpoint the oracle fixtures were generated from
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from engine.model import TTSModel

    return TTSModel.load(tiny_checkpoint)
