"""The codec stage inside the engine: one lockstep call per step, its counters, and a refused stream."""

import numpy as np
import pytest

from engine.api import Request, StopReason
from engine.config import EngineConfig
from engine.engine import Engine
from tests.engine.test_engine import run_all


@pytest.fixture(scope="module")
def voice(tiny_model):
    t = np.arange(24000) / 24000
    return tiny_model.voice_prompt((0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), x_vector_only=True)


@pytest.fixture()
def engine(tiny_model):
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=256, max_running=8, chunk_frames=(1, 2, 4, 8, 12)))
    yield eng
    eng.shutdown()


def requests(tiny_model, voice, n: int, tag: str) -> list[Request]:
    return [Request(text="Staggered streams share one codec call.", voice=voice, max_frames=10 + 3 * i,
                    sampling=tiny_model.sampling(greedy=True), request_id=f"{tag}{i}") for i in range(n)]


def test_staggered_streams_cost_at_most_one_codec_call_per_step(tiny_model, voice, engine):
    results = run_all(engine, requests(tiny_model, voice, 6, "s"), stagger=0.15)
    assert all(f.stop_reason in (StopReason.EOS, StopReason.MAX_FRAMES) for _, f in results)
    counters = engine.stats().counters
    frames = sum(f.frames for _, f in results)
    assert counters["codec_frames"] == frames == engine.stats().frames_generated
    assert 0 < counters["codec_calls"] <= counters["engine_steps"]
    for chunks, f in results:
        assert sum(c.samples.size for c in chunks) == 1920 * f.frames


def test_a_stream_the_codec_cannot_hold_fails_alone_and_the_engine_goes_on(tiny_model, voice, engine):
    free = list(engine.codec.decoder.pool.free)
    engine.codec.decoder.pool.free.clear()  # as if every row were taken (the engine is idle here)
    ((chunks, finished),) = run_all(engine, requests(tiny_model, voice, 1, "full"))
    assert finished.stop_reason == StopReason.ERROR and finished.error_code == "OVERLOADED" and chunks == []
    engine.codec.decoder.pool.free.extend(free)
    ((chunks, finished),) = run_all(engine, requests(tiny_model, voice, 1, "after"))
    assert finished.stop_reason != StopReason.ERROR and sum(c.samples.size for c in chunks) == 1920 * finished.frames
    assert engine.codec.decoder.pool.num_used == 0 and engine.stats().running == 0
