"""Admission cannot leak: any failure while the engine admits a request (a seed torch refuses, a
bug in a later admission step) becomes that request's coded Finished, and the engine holds nothing
of it afterwards (issue #13, item 1)."""

import asyncio

import numpy as np
import pytest

from engine.api import Request, StopReason
from engine.config import EngineConfig
from engine.engine import Engine


@pytest.fixture(scope="module")
def voice(tiny_model):
    t = np.arange(24000) / 24000
    return tiny_model.voice_prompt((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), x_vector_only=True)


@pytest.fixture()
def engine(tiny_model):
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=64))
    yield eng
    eng.shutdown()


def finish(engine, request, timeout=60.0):
    async def main():
        async def drain():
            last = None
            async for item in engine.submit(request):
                last = item
            return last
        return await asyncio.wait_for(drain(), timeout)  # a leaked admission hangs here
    return asyncio.run(main())


def assert_nothing_held(engine):
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, 0), stats
    assert not engine._states and not engine._consumers
    # Codec closes are queued on the codec worker before Finished is sent: wait for them, then look.
    engine._codec_worker.submit(lambda: None).result(timeout=10)
    assert not engine.codec.streams


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1])
def test_a_seed_torch_refuses_is_invalid_request_and_leaks_nothing(tiny_model, voice, engine, seed):
    sampling = tiny_model.sampling().with_overrides(seed=seed)
    fin = finish(engine, Request(text="Hello.", voice=voice, sampling=sampling, max_frames=3, request_id="s"))
    assert fin.stop_reason == StopReason.ERROR and fin.error_code == "INVALID_REQUEST", fin
    assert_nothing_held(engine)
    ok = finish(engine, Request(text="Hello.", voice=voice, sampling=tiny_model.sampling(greedy=True), max_frames=3,
                                request_id="ok"))
    assert ok.frames == 3 and ok.stop_reason == StopReason.MAX_FRAMES
    assert_nothing_held(engine)


def test_a_failure_after_registration_is_undone(tiny_model, voice, engine, monkeypatch):
    # The last admission step fails: the guard must take back what the earlier steps registered.
    def broken_add(state):
        raise RuntimeError("scheduler bug")
    monkeypatch.setattr(engine.scheduler, "add", broken_add)
    fin = finish(engine, Request(text="Hello.", voice=voice, max_frames=3, request_id="b"))
    assert fin.stop_reason == StopReason.ERROR and fin.error_code == "SYNTHESIS_ERROR", fin
    assert_nothing_held(engine)
