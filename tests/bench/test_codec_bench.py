"""bench/codec.py: the codec stage driven from outside, on the tiny checkpoint, this tree and another module."""

from pathlib import Path

import pytest

from bench.codec import run_one

ROOT_MODULE = str(Path(__file__).resolve().parents[2] / "engine" / "codec_stream.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


# The default import, and the same file loaded by path (as --codec-module loads another tree's).
@pytest.mark.parametrize("module", [None, ROOT_MODULE], ids=["import", "by-path"])
def test_staggered_streams_are_measured_with_one_call_per_step(tiny, module):
    r = run_one(str(tiny), sessions=14, frames=5, module_path=module, threads=1, schedule=(1, 2, 4, 8, 12),
                capacity=16, device="cpu")
    assert r["frames"] == 70 and r["decoder_calls"] == 12 + 5 - 1  # stream i starts at step i mod 12
    assert r["calls_per_busy_step"] == 1.0 and r["ms_per_frame"] > 0
    assert r["state_mib_per_stream"] > 0 and r["peak_working_mib"] >= 0 and r["peak_cuda_mib"] is None
