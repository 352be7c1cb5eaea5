import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)
