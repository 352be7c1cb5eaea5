"""The serving engine: batch invariance, streaming = full decode, no leaks, cancellation."""

import asyncio
import time

import numpy as np
import pytest
import torch

from engine.api import Priority, Request, StopReason
from engine.config import EngineConfig
from engine.engine import Engine
from engine.voice import VoicePrompt

TEXTS = ["Hi.", "A slightly longer sentence to speak.", "Short one.",
         "The quick brown fox jumps over the lazy dog and keeps running far away.", "Numbers 1 2 3."]


@pytest.fixture(scope="module")
def voices(tiny_model):
    t = np.arange(36000) / 24000
    wave_a = (0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 1.5 * t)).astype(np.float32)
    wave_b = (0.2 * np.sign(np.sin(2 * np.pi * 95 * t)) + 0.05 * np.sin(2 * np.pi * 700 * t)).astype(np.float32)
    return {
        "icl_a": tiny_model.voice_prompt(wave_a, "Reference one."),
        "xvec_a": tiny_model.voice_prompt(wave_a, x_vector_only=True),
        "icl_b": tiny_model.voice_prompt(wave_b[:30000], "A second reference voice."),
        "xvec_b": tiny_model.voice_prompt(wave_b, x_vector_only=True),
    }


@pytest.fixture()
def engine(tiny_model):
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=256, max_batched_tokens=64, chunk_frames=(1, 2, 4)))
    yield eng
    eng.shutdown()


def mixed_requests(voices, n=10):
    names = list(voices)
    reqs = []
    for i in range(n):
        reqs.append(Request(text=TEXTS[i % len(TEXTS)], voice=voices[names[i % len(names)]],
                            language=["english", "auto", "chinese"][i % 3], max_frames=6 + (i * 5) % 17,
                            non_streaming_text=i % 4 == 3, request_id=f"r{i}"))
    return reqs


async def collect(engine, request, delay=0.0):
    await asyncio.sleep(delay)
    chunks, finished = [], None
    async for item in engine.submit(request):
        if hasattr(item, "samples"):
            chunks.append(item)
        else:
            finished = item
    return chunks, finished


def run_all(engine, requests, stagger=0.0, timeout=180.0):
    async def main():
        # Bounded: a dead engine thread must fail the test, not hang it.
        return await asyncio.wait_for(
            asyncio.gather(*(collect(engine, r, i * stagger) for i, r in enumerate(requests))), timeout)
    return asyncio.run(main())


def greedy(tiny_model):
    return tiny_model.sampling(greedy=True)


def test_batched_greedy_codes_equal_each_request_alone(tiny_model, voices, engine):
    requests = mixed_requests(voices, 10)
    for r in requests:
        r.sampling = greedy(tiny_model)
    results = run_all(engine, requests, stagger=0.01)
    for req, (chunks, fin) in zip(requests, results, strict=True):
        alone = tiny_model.synthesize(req.text, req.voice, req.language, greedy(tiny_model), req.max_frames,
                                      req.non_streaming_text)
        assert fin.stop_reason in (StopReason.EOS, StopReason.MAX_FRAMES), fin
        assert np.array_equal(fin.codes, alone.codes.numpy()), req.request_id
        # Streaming equals the full decode, exactly 1920 samples per frame.
        streamed = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
        assert streamed.shape == (1920 * fin.frames,)
        full = tiny_model.decode(torch.from_numpy(fin.codes), req.voice)
        assert np.abs(streamed - full).max() <= 1e-5
        assert [c.first_frame for c in chunks] == list(np.cumsum([0] + [c.num_frames for c in chunks[:-1]]))
    assert engine.blocks.num_used == 0


def test_batched_seeded_codes_equal_each_request_alone_with_staggered_arrivals(tiny_model, voices, engine):
    requests = mixed_requests(voices, 6)
    for i, r in enumerate(requests):
        r.sampling = tiny_model.sampling(seed=40 + i)
    alone = [run_all(engine, [Request(**{**r.__dict__, "request_id": r.request_id + "-alone"})])[0][1]
             for r in requests]
    together = run_all(engine, requests, stagger=0.01)
    assert engine.stats().counters["decode_rows{path=eager}"] == 0
    for req, want, (_, got) in zip(requests, alone, together, strict=True):
        assert got.frames > 0 and np.array_equal(got.codes, want.codes), req.request_id


def test_neighbours_do_not_change_output(tiny_model, voices, engine):
    probe = Request(text=TEXTS[1], voice=voices["icl_b"], language="english", max_frames=12,
                    sampling=tiny_model.sampling(seed=5), request_id="probe")
    alone = run_all(engine, [probe])[0]
    others = mixed_requests(voices, 7)
    for r in others:
        r.sampling = tiny_model.sampling(seed=99)
    probe2 = Request(**{**probe.__dict__, "request_id": "probe2"})
    together = run_all(engine, [*others[:3], probe2, *others[3:]], stagger=0.005)[3]
    assert np.array_equal(alone[1].codes, together[1].codes)
    a = np.concatenate([c.samples for c in alone[0]])
    b = np.concatenate([c.samples for c in together[0]])
    # Codes are identical; the audio is too up to fp32 rounding: the codec batches the chunks that
    # are due together, and a batch of different size rounds a convolution differently (~1e-7).
    # A voice leaking from a neighbour would differ by the signal itself (~1e-2 here).
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6


def test_cancel_mid_stream_frees_blocks_and_spares_others(tiny_model, voices, engine):
    async def main():
        victim = Request(text=TEXTS[3], voice=voices["xvec_a"], max_frames=60, request_id="victim",
                         sampling=greedy(tiny_model))
        other = Request(text=TEXTS[1], voice=voices["icl_a"], max_frames=10, request_id="other",
                        sampling=greedy(tiny_model))
        seen = 0
        other_task = asyncio.create_task(collect(engine, other))
        async for _chunk in engine.submit(victim):
            seen += 1
            if seen == 2:
                break  # leaving the iterator cancels the request
        _, other_fin = await other_task
        return other_fin
    other_fin = asyncio.run(main())
    alone = tiny_model.synthesize(TEXTS[1], voices["icl_a"], "auto", greedy(tiny_model), 10)
    assert np.array_equal(other_fin.codes, alone.codes.numpy())
    # The cancel is processed at the start of the engine's next step.
    deadline = time.monotonic() + 5
    while engine.blocks.num_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.blocks.num_used == 0


def test_preemption_recomputes_and_keeps_outputs_and_frees_blocks(tiny_model, voices):
    # 6 blocks of 16 rows cannot hold three ~40-row requests at once: someone gets preempted.
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=7, max_batched_tokens=64, chunk_frames=(2,)))
    try:
        reqs = [Request(text=TEXTS[i], voice=voices["icl_a" if i % 2 else "xvec_b"], max_frames=24,
                        sampling=greedy(tiny_model), request_id=f"p{i}",
                        priority=[Priority.HIGH, Priority.NORMAL, Priority.LOW][i]) for i in range(3)]
        results = run_all(eng, reqs)
        for req, (_, fin) in zip(reqs, results, strict=True):
            alone = tiny_model.synthesize(req.text, req.voice, req.language, greedy(tiny_model), req.max_frames)
            assert np.array_equal(fin.codes, alone.codes.numpy()), req.request_id
        assert eng.blocks.num_used == 0
        assert eng.stats().extra["preemptions"] >= 1
    finally:
        eng.shutdown()


def test_bad_request_reports_an_error_and_engine_keeps_working(tiny_model, voices, engine):
    bad = Request(text="Hello", voice=voices["xvec_a"], language="klingon", request_id="bad")
    _, fin = run_all(engine, [bad])[0]
    assert fin.stop_reason == StopReason.ERROR and "klingon" in fin.error
    ok = Request(text="Hello", voice=voices["xvec_a"], max_frames=3, request_id="ok", sampling=greedy(tiny_model))
    _, fin = run_all(engine, [ok])[0]
    assert fin.frames == 3


def test_voice_prompt_roundtrip(tmp_path, voices):
    v = voices["icl_a"]
    v.save(tmp_path / "v.safetensors")
    w = VoicePrompt.load(tmp_path / "v.safetensors")
    assert torch.equal(v.speaker_embedding, w.speaker_embedding) and torch.equal(v.ref_codes, w.ref_codes)
    assert v.ref_text_ids == w.ref_text_ids


def test_same_voice_prefix_is_shared_and_changes_nothing(tiny_model, voices, engine):
    voice = voices["icl_b"]  # a long ICL prompt: several full blocks before the target text
    first = Request(text=TEXTS[0], voice=voice, language="english", max_frames=5, sampling=greedy(tiny_model),
                    request_id="first")
    run_all(engine, [first])
    before = engine.stats().extra["prefix_rows_reused"]
    second = Request(text=TEXTS[2], voice=voice, language="english", max_frames=7, sampling=greedy(tiny_model),
                     request_id="second")
    _, fin = run_all(engine, [second])[0]
    assert engine.stats().extra["prefix_rows_reused"] - before >= 16
    alone = tiny_model.synthesize(TEXTS[2], voice, "english", greedy(tiny_model), 7)
    assert np.array_equal(fin.codes, alone.codes.numpy())
    assert engine.blocks.num_used == 0 and engine.blocks.num_cached > 0


def test_slow_consumer_pauses_only_itself(tiny_model, voices):
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=128, chunk_frames=(1,), output_queue_chunks=3))
    try:
        async def main():
            slow = Request(text=TEXTS[3], voice=voices["xvec_a"], max_frames=40, sampling=greedy(tiny_model),
                           request_id="slow")
            fast = Request(text=TEXTS[1], voice=voices["xvec_b"], max_frames=20, sampling=greedy(tiny_model),
                           request_id="fast")
            slow_iter = eng.submit(slow).__aiter__()
            await slow_iter.__anext__()  # started; now stop reading
            _, fast_fin = await collect(eng, fast)
            frames_while_paused = len(eng._states["slow"].frames)
            rest = [item async for item in slow_iter]
            return fast_fin, frames_while_paused, rest[-1]
        fast_fin, frames_while_paused, slow_fin = asyncio.run(main())
        assert fast_fin.frames == 20 or fast_fin.stop_reason == StopReason.EOS
        # One chunk read, three queued: the slow request stopped a frame or two later, not at 40.
        assert frames_while_paused <= 1 + 3 + 2
        assert slow_fin.stop_reason in (StopReason.EOS, StopReason.MAX_FRAMES) and slow_fin.frames > frames_while_paused
        assert eng.blocks.num_used == 0
    finally:
        eng.shutdown()


def test_text_the_tokenizer_cannot_encode_fails_that_request_only(tiny_model, voices, engine):
    bad = Request(text="lone surrogate \ud800 here", voice=voices["xvec_a"], request_id="surrogate")
    _, fin = run_all(engine, [bad])[0]
    assert fin.stop_reason == StopReason.ERROR and fin.error_code in ("INVALID_REQUEST", "SYNTHESIS_ERROR")
    ok = Request(text="Still alive.", voice=voices["xvec_a"], max_frames=2, request_id="after",
                 sampling=greedy(tiny_model))
    _, fin = run_all(engine, [ok])[0]
    assert fin.frames == 2


def test_cancel_before_the_first_frame(tiny_model, voices, engine):
    async def main():
        req = Request(text=TEXTS[3], voice=voices["icl_a"], max_frames=30, request_id="early")
        stream = engine.submit(req).__aiter__()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the admission is queued now
        engine.cancel("early")  # queued right behind it: cancelled before any step
        return [await first] + [item async for item in stream]
    items = asyncio.run(asyncio.wait_for(main(), 60))
    fin = items[-1]
    assert fin.stop_reason == StopReason.CANCELLED and fin.frames == 0 and fin.codes.shape == (0, 16)
    deadline = time.monotonic() + 5
    while engine.blocks.num_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.blocks.num_used == 0


def test_a_request_the_pool_cannot_hold_fails_alone_and_the_engine_goes_on(tiny_model, voices):
    # 3 blocks of 16 rows: the prompt fits, but the utterance outgrows the pool with nobody to preempt.
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=3, chunk_frames=(1,)))
    try:
        big = Request(text="Hi.", voice=voices["xvec_a"], max_frames=60, sampling=greedy(tiny_model),
                      request_id="big")
        _, fin = run_all(eng, [big], timeout=60)[0]
        assert fin.stop_reason in (StopReason.ERROR, StopReason.EOS)
        if fin.stop_reason == StopReason.ERROR:
            assert fin.error_code == "OVERLOADED" and fin.frames > 0
        small = Request(text="Hi.", voice=voices["xvec_a"], max_frames=3, sampling=greedy(tiny_model),
                        request_id="small")
        _, fin = run_all(eng, [small], timeout=60)[0]
        assert fin.frames == 3 and eng.blocks.num_used == 0
    finally:
        eng.shutdown()


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_a_request_that_breaks_the_step_fails_alone(tiny_model, voices, monkeypatch, fault):
    """``raise``: an exception midway through a frame. ``nan``: NaN logits for one row, which the device
    sampler flags and the host fails once the whole frame (every row's next input) has been computed."""
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=256, chunk_frames=(2,)))
    real = eng.runner.decode.draw_predictor

    def poisoned(logits, b, j, invalid):
        # Midway through a frame (the talker and 7 predictor draws done): the retry must start it afresh.
        poison = eng._states.get("poison")
        if j == 7 and poison is not None and poison.slot is not None and poison.slot < b \
                and eng.runner.buf.sampling.np[poison.slot] and len(poison.frames) >= 2:
            if fault == "raise":
                raise RuntimeError("injected failure")
            logits = logits.clone()
            logits[poison.slot] = float("nan")
        return real(logits, b, j, invalid)

    monkeypatch.setattr(eng.runner.decode, "draw_predictor", poisoned)
    try:
        reqs = [Request(text=TEXTS[i], voice=voices["xvec_a" if i % 2 else "icl_b"], max_frames=8,
                        sampling=tiny_model.sampling(seed=i), request_id=f"h{i}") for i in range(3)]
        reqs.append(Request(text="POISON pill.", voice=voices["xvec_b"], max_frames=8, request_id="poison",
                            sampling=greedy(tiny_model)))
        alone = [run_all(eng, [Request(**{**r.__dict__, "request_id": r.request_id + "-alone"})])[0][1]
                 for r in reqs[:3]]
        results = run_all(eng, reqs)
        for req, (_, fin), want in zip(reqs[:3], results[:3], alone, strict=True):
            # Seeded draws, retried one by one after the failed step: the same codes as the request alone.
            assert np.array_equal(fin.codes, want.codes), req.request_id
        poison = results[3][1]
        assert poison.stop_reason == StopReason.ERROR and poison.error_code == "SYNTHESIS_ERROR"
        assert eng.blocks.num_used == 0 and eng._thread.is_alive()
    finally:
        eng.shutdown()


def test_warm_up_runs_every_batch_shape_and_leaves_nothing(tiny_model, engine):
    before = engine.stats()
    engine.warm_up()  # CUDA engines run this when constructed; here it must also work from inside a loop

    async def inside_a_loop():
        engine.warm_up()
    asyncio.run(inside_a_loop())
    after = engine.stats()
    assert engine.blocks.num_used == 0
    assert after.frames_generated - before.frames_generated == 2 * 2 * (1 + 3 + 16)
