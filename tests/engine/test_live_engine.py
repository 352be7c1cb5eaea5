"""Live text through the engine: the text arriving in pieces, with pauses, beside other requests,
gives bitwise the codes and audio of the text sent whole; a long wait makes no frame and no EOS.

Chunking is pinned (``deadline_flush=False``): the deadline flush moves chunk seams by timing, and
the codec's output is equal across chunk seams only to float rounding (engine/codec_stream.py).
"""

import asyncio
import random
import time

import numpy as np
import pytest
import torch

from engine.api import AudioChunk, Request, StopReason
from engine.config import EngineConfig
from engine.engine import Engine

TEXT = "Hello there, how are you today?"


@pytest.fixture(scope="module")
def voices(tiny_model):
    t = np.arange(36000) / 24000
    wave = (0.3 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 1.5 * t)).astype(np.float32)
    return {"icl": tiny_model.voice_prompt(wave, "Reference one."),
            "xvec": tiny_model.voice_prompt(wave, x_vector_only=True)}


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=256, max_batched_tokens=64, chunk_frames=(1, 2, 4),
                                          deadline_flush=False))
    yield eng
    eng.shutdown()


def request(tiny_model, voice, rid, text=TEXT, live=False, max_frames=None):
    return Request(text=text, voice=voice, sampling=tiny_model.sampling(greedy=True), max_frames=max_frames,
                   request_id=rid, live=live)


async def drain(stream):
    chunks, finished = [], None
    async for item in stream:
        if isinstance(item, AudioChunk):
            chunks.append(item)
        else:
            finished = item
    return np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32), finished


async def live(engine, req, pieces, pauses):
    """Submit ``req`` live and feed it ``pieces`` (the first goes in Request.text), sleeping between them."""
    req.text = pieces[0]
    task = asyncio.ensure_future(drain(engine.submit(req)))
    await asyncio.sleep(0)  # the stream's first step queues the admission before any append
    for piece, pause in zip(pieces[1:], pauses, strict=True):
        await asyncio.sleep(pause)
        engine.append_text(req.request_id, piece)
    engine.end_text(req.request_id)
    return await task


def splits(text: str, rng: random.Random) -> dict[str, list[str]]:
    cuts = sorted(rng.sample(range(1, len(text)), 6))
    return {
        "words": [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]],
        "chars": list(text),
        "mid_word": [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)],
    }


@pytest.fixture(scope="module")
def whole(tiny_model, voices, engine):
    """The reference: each voice's text sent whole, alone."""
    async def main():
        return {name: await drain(engine.submit(request(tiny_model, v, f"whole-{name}")))
                for name, v in voices.items()}
    return asyncio.run(main())


def waits_for_text(engine, rid) -> bool:
    state = engine._states.get(rid)
    return state is not None and bool(state.frames) and not state.may_sample


def pauses_for(pieces, rng):
    # 0-150 ms between pieces (a tiny-model frame takes a few ms): most go back to back.
    return [rng.choice([0.0, 0.0, 0.0, 0.02, 0.15]) for _ in pieces[1:]]


@pytest.mark.parametrize("voice", ["icl", "xvec"])
def test_any_split_with_pauses_equals_the_whole_text_bitwise(tiny_model, voices, engine, whole, voice):
    audio0, fin0 = whole[voice]
    assert fin0.frames > 3 and fin0.stop_reason == StopReason.EOS
    rng = random.Random(voice)
    for name, pieces in splits(TEXT, rng).items():
        req = request(tiny_model, voices[voice], f"live-{voice}-{name}", live=True)
        audio, fin = asyncio.run(asyncio.wait_for(live(engine, req, pieces, pauses_for(pieces, rng)), 300))
        assert fin.stop_reason == fin0.stop_reason and fin.frames == fin0.frames, name
        np.testing.assert_array_equal(fin.codes, fin0.codes)
        np.testing.assert_array_equal(audio, audio0)  # bitwise, not close


@pytest.mark.parametrize("voice", ["icl", "xvec"])
def test_live_beside_other_requests_keeps_its_codes(tiny_model, voices, engine, whole, voice):
    audio0, fin0 = whole[voice]
    rng = random.Random(f"{voice}-beside")

    async def main():
        jobs = [live(engine, request(tiny_model, voices[voice], f"beside-{voice}-{name}", live=True), pieces,
                     pauses_for(pieces, rng)) for name, pieces in splits(TEXT, rng).items()]
        other = "xvec" if voice == "icl" else "icl"
        jobs.append(drain(engine.submit(request(tiny_model, voices[other], f"other-{voice}", max_frames=12))))
        return await asyncio.wait_for(asyncio.gather(*jobs), 300)

    *lives, (_, other) = asyncio.run(main())
    assert other.frames == 12
    for audio, fin in lives:
        assert fin.stop_reason == fin0.stop_reason and fin.frames == fin0.frames
        np.testing.assert_array_equal(fin.codes, fin0.codes)
        # As for any request with neighbours (tests/engine/test_engine.py): the codec decodes the chunks
        # due together in one batch, and another batch size rounds its convolutions differently (~1e-7).
        assert audio.shape == audio0.shape and np.abs(audio - audio0).max() <= 1e-6


@pytest.mark.parametrize("voice", ["xvec", "icl"])
def test_a_two_second_wait_makes_no_frame_and_no_early_end(tiny_model, voices, engine, whole, voice):
    audio0, fin0 = whole[voice]
    rid = f"late-{voice}"
    half = TEXT.index("how")
    seen: list[int] = []

    async def main():
        req = request(tiny_model, voices[voice], rid, text=TEXT[:half], live=True)
        task = asyncio.ensure_future(drain(engine.submit(req)))
        # Until the request has used up the first half: its next frame waits for its text row.
        deadline = time.perf_counter() + 60  # bounded: an engine that never waits fails, not hangs
        while not waits_for_text(engine, rid):
            assert time.perf_counter() < deadline, "the request never waited for its text"
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            seen.append(len(engine._states[rid].frames))
            await asyncio.sleep(0.1)
        engine.append_text(rid, TEXT[half:])
        engine.end_text(rid)
        return await task

    audio, fin = asyncio.run(main())
    assert seen[0] > 0 and len(set(seen)) == 1, seen  # frames before the wait, none during it
    assert seen[0] < fin0.frames
    assert fin.stop_reason == StopReason.EOS and fin.frames == fin0.frames
    np.testing.assert_array_equal(fin.codes, fin0.codes)
    np.testing.assert_array_equal(audio, audio0)


def test_live_errors_fail_that_request_only(tiny_model, voices, engine):
    async def main():
        empty = request(tiny_model, voices["xvec"], "live-empty", text="", live=True)
        task = asyncio.ensure_future(drain(engine.submit(empty)))
        await asyncio.sleep(0)
        engine.end_text("live-empty")
        bad = request(tiny_model, voices["xvec"], "live-bad", text="Hi <tts_text", live=True)
        task2 = asyncio.ensure_future(drain(engine.submit(bad)))
        await asyncio.sleep(0)
        engine.append_text("live-bad", "_eod> there")
        engine.append_text("gone", "nobody")  # an unknown id is ignored
        ok = drain(engine.submit(request(tiny_model, voices["xvec"], "after", max_frames=3)))
        return await asyncio.wait_for(asyncio.gather(task, task2, ok), 120)

    (_, e1), (_, e2), (_, fin) = asyncio.run(main())
    assert e1.error_code == "INVALID_REQUEST" and "empty" in e1.error
    assert e2.error_code == "INVALID_REQUEST" and "reserved" in e2.error
    assert fin.frames == 3
    assert not engine._states and engine.blocks.num_used == 0


@pytest.mark.parametrize("voice", ["icl", "xvec"])
def test_a_live_prompt_fed_in_pieces_builds_the_whole_prompt_bitwise(tiny_model, voices, voice):
    from engine.live_prompt import LivePrompt
    from engine.prompt import build_prompt

    tok, talker, cfg = tiny_model.tokenizer, tiny_model.tts.talker, tiny_model.cfg
    ids = tok.target_ids(TEXT)
    want = build_prompt(talker, cfg, tok.role_ids(), ids, voices[voice], "english")
    got = LivePrompt(talker, cfg, tok.role_ids(), voices[voice], "english")
    assert got.length == want.length and got.prefill.shape[0] < got.length  # the text rows wait
    for a, b in [(0, 1), (1, 4), (4, 5), (5, len(ids))]:
        got.extend(ids[a:b])
        known = got.prefill.shape[0]
        assert known <= want.length and torch.equal(got.prefill, want.prefill[:known])
    assert got.trailing_row(len(ids)) is None  # past the known text, before the end: unknown, not PAD
    got.end()
    assert torch.equal(got.prefill, want.prefill)
    for g in range(len(ids) + 3):
        assert torch.equal(got.trailing_row(g), want.trailing_row(g)), g


def test_with_the_deadline_flush_a_waiting_request_has_sent_every_frame_it_made(tiny_model, voices):
    eng = Engine(tiny_model, EngineConfig(num_kv_blocks=64, chunk_frames=(1, 2, 4, 8, 12), deadline_flush=True))
    rid, got = "flushed", []

    async def main():
        req = request(tiny_model, voices["xvec"], rid, text=TEXT[:TEXT.index("how")], live=True)

        async def consume():
            async for item in eng.submit(req):
                got.append(item)

        task = asyncio.ensure_future(consume())
        deadline = time.perf_counter() + 60
        while not waits_for_text(eng, rid):
            assert time.perf_counter() < deadline, "the request never waited for its text"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the flush rides on the step that found the text missing, plus one codec job
        made = len(eng._states[rid].frames)
        sent = sum(c.num_frames for c in got if isinstance(c, AudioChunk))
        eng.end_text(rid)
        await asyncio.wait_for(task, 120)
        return made, sent

    try:
        made, sent = asyncio.run(main())
    finally:
        eng.shutdown()
    assert made > 4 and sent == made  # chunks of 8 and 12 would hold up to 11 frames back


def test_the_first_frame_waits_for_the_text_row_that_joins_it(tiny_model, voices, engine):
    """One-letter words commit one id at a time: the x-vector prompt is complete with the first id, and
    frame 0 must still wait for the second (its input carries it); the audio is the whole text's."""
    text = "I a b c d e."
    async def main():
        alone = await drain(engine.submit(request(tiny_model, voices["xvec"], "one-id-whole", text=text)))
        req = request(tiny_model, voices["xvec"], "one-id-live", live=True)
        return alone, await live(engine, req, list(text), [0.05] * (len(text) - 1))

    (audio0, fin0), (audio, fin) = asyncio.run(asyncio.wait_for(main(), 300))
    assert fin.stop_reason == fin0.stop_reason and fin.error is None
    np.testing.assert_array_equal(fin.codes, fin0.codes)
    np.testing.assert_array_equal(audio, audio0)
