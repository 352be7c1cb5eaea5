"""The streaming codec decoder: chunks equal the one-pass decode, per request, whoever shares the batch."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from engine.codec_stream import CodecStream
from engine.config import CodecDecoderConfig
from engine.models.speech_tokenizer import SpeechTokenizer

SPF = 1920
TOL = 1e-5
SCHEDULE = (1, 2, 4, 8, 12)


@pytest.fixture(scope="module")
def tok(tiny_model) -> SpeechTokenizer:
    return tiny_model.speech_tokenizer


class FakeClock:
    """Each reading is one step later: a codec stream's notion of time, made deterministic."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def random_codes(frames: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randint(0, size, (frames, 16), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def one_pass(tok: SpeechTokenizer, gen: torch.Tensor, ref: torch.Tensor | None = None) -> np.ndarray:
    """CodecDecoder.forward over reference + generated, reference part cut: the exact answer."""
    codes = gen if ref is None else torch.cat([ref, gen])
    audio = tok.decoder(codes.T[None])[0, 0].numpy()
    return audio[(0 if ref is None else ref.shape[0]) * SPF:]


def stream(tok: SpeechTokenizer, requests: dict[str, tuple[torch.Tensor | None, torch.Tensor, int]],
           schedule: tuple[int, ...] = SCHEDULE, cs: CodecStream | None = None) -> dict[str, list]:
    """Run requests {id: (ref, gen, first step)} as the engine does: one frame per request per
    step, collect after every step, the last frame's step flushes, close when done."""
    cs = cs or CodecStream(tok, schedule, SPF, clock=FakeClock(0.001))
    chunks: dict[str, list] = {rid: [] for rid in requests}
    for step in range(max(start + len(gen) for _, gen, start in requests.values())):
        finals = set()
        for rid, (ref, gen, start) in requests.items():
            k = step - start
            if k == 0:
                cs.open(rid, ref)
                prefill = cs.streams[rid].prefill
                if prefill is not None:
                    prefill.result()  # ready before the first frame, as the talker's prefill of it takes a step
            if 0 <= k < len(gen):
                cs.push(rid, gen[k].tolist())
                if k == len(gen) - 1:
                    finals.add(rid)
        for c in cs.collect(finals):
            chunks[c.request_id].append(c)
        for rid in finals:
            cs.close(rid)
    return chunks


def samples(chunks: list) -> np.ndarray:
    return np.concatenate([c.samples for c in chunks])


def check_chunks(chunks: list, frames: int, schedule: tuple[int, ...]) -> None:
    sizes = [c.num_frames for c in chunks]
    expected = [schedule[min(i, len(schedule) - 1)] for i in range(len(sizes))]
    assert sizes[:-1] == expected[:-1] and 0 < sizes[-1] <= expected[-1]  # the last is the flush
    assert sum(sizes) == frames
    assert [c.first_frame for c in chunks] == list(np.cumsum([0] + sizes[:-1]))
    assert all(c.samples.dtype == np.float32 and c.samples.shape == (SPF * c.num_frames,) for c in chunks)


@pytest.mark.parametrize("schedule", [(1,), SCHEDULE, (5,)])
@pytest.mark.parametrize("frames", [1, 7, 30])
def test_streaming_equals_one_pass(tok, schedule, frames):
    gen = random_codes(frames, seed=frames)
    chunks = stream(tok, {"a": (None, gen, 0)}, schedule)["a"]
    check_chunks(chunks, frames, schedule)
    assert np.abs(samples(chunks) - one_pass(tok, gen)).max() <= TOL


@pytest.mark.parametrize("ref_frames", [3, 20])  # shorter and longer than the window and the vocoder tail
def test_icl_reference_is_left_context(tok, ref_frames):
    ref, gen = random_codes(ref_frames, seed=1), random_codes(25, seed=2)
    chunks = stream(tok, {"a": (ref, gen, 0)})["a"]
    check_chunks(chunks, 25, SCHEDULE)
    streamed = samples(chunks)
    assert np.abs(streamed - one_pass(tok, gen, ref)).max() <= TOL
    assert np.abs(streamed - one_pass(tok, gen)).max() > 1e-3  # the reference does condition the audio


def test_prefill_tail_is_long_enough_to_matter(tok):
    # The prefill runs the convolutional half over the last few reference frames only. Too few
    # would change the audio; the test above would notice (this checks that it can).
    ref, gen = random_codes(30, seed=3), random_codes(6, seed=4)
    cs = CodecStream(tok, (6,), SPF)
    cs.decoder.vocode_history = 4
    short = samples(stream(tok, {"a": (ref, gen, 0)}, cs=cs)["a"])
    assert np.abs(short - one_pass(tok, gen, ref)).max() > TOL


def test_flush_without_pending_frames_sends_nothing(tok):
    cs = CodecStream(tok, (4,), SPF)
    cs.open("a", None)
    assert cs.collect({"a"}) == []
    for f in random_codes(3, seed=5).tolist():
        cs.push("a", f)
    assert cs.collect(set()) == []  # 3 < 4: not due yet
    assert [c.num_frames for c in cs.collect({"a"})] == [3]
    assert cs.collect({"a"}) == []


def test_window_slides_at_tiny_size(tok):
    assert tok.cfg.decoder.sliding_window == 8
    ref, gen = random_codes(10, seed=6), random_codes(60, seed=7)
    chunks = stream(tok, {"a": (ref, gen, 0)})["a"]
    assert np.abs(samples(chunks) - one_pass(tok, gen, ref)).max() <= TOL


def with_window(tok: SpeechTokenizer, window: int) -> SpeechTokenizer:
    """The same weights with another attention window (the window has no weights)."""
    decoder = CodecDecoderConfig({**tok.cfg.decoder.raw, "sliding_window": window})
    out = SpeechTokenizer(dataclasses.replace(tok.cfg, decoder=decoder)).eval()
    out.load_state_dict(tok.state_dict())
    return out


def test_window_slides_at_real_window(tok):
    real = with_window(tok, 72)  # the real model's window
    ref, gen = random_codes(30, seed=8), random_codes(70, seed=9)  # 100 frames, > 72
    streamed = samples(stream(real, {"a": (ref, gen, 0)})["a"])
    assert np.abs(streamed - one_pass(real, gen, ref)).max() <= TOL
    # The window did cut: attention over all 100 frames gives other audio at the end.
    assert np.abs(streamed - one_pass(with_window(tok, 128), gen, ref)).max() > 1e-4


def mixed(seed: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor, int]]:
    """Six requests, plain and ICL with different references, different lengths and starts
    (opened while others run, in calls of several buckets with padding rows)."""
    out = {}
    for i in range(6):
        ref = random_codes(4 + 7 * i, seed=seed + 100 + i) if i % 2 else None
        out[f"r{i}"] = (ref, random_codes(9 + 6 * i, seed=seed + 200 + i), [0, 0, 1, 3, 3, 9][i])
    return out


def test_batched_requests_equal_each_alone(tok):
    requests = mixed(seed=0)
    together = stream(tok, requests)
    for rid, (ref, gen, _) in requests.items():
        alone = samples(stream(tok, {rid: requests[rid]})[rid])
        both = samples(together[rid])
        assert np.abs(both - alone).max() <= 1e-6, rid
        assert np.abs(both - one_pass(tok, gen, ref)).max() <= TOL, rid


def test_neighbours_do_not_change_a_request(tok):
    probe = (random_codes(12, seed=11), random_codes(30, seed=12), 2)
    runs = []
    for seed in (1, 2):  # different neighbours: other references, codes and lengths
        requests = {**mixed(seed), "probe": probe}
        runs.append(samples(stream(tok, requests)["probe"]))
    assert np.abs(runs[0] - runs[1]).max() <= 1e-6


def test_close_frees_state_and_a_reused_slot_starts_clean(tok):
    cs = CodecStream(tok, (1,), SPF)
    ref = random_codes(15, seed=13)
    for rid in ("a", "b", "c"):
        cs.open(rid, ref)
        cs.streams[rid].prefill.result()
        cs.push(rid, random_codes(1, seed=14)[0].tolist())
    cs.collect(set())
    assert cs.decoder.pool.num_used == 3
    b_slot = cs.streams["b"].slot
    cs.close("b")
    assert "b" not in cs.streams and cs.decoder.pool.num_used == 2
    with pytest.raises(KeyError):
        cs.push("b", [0] * 16)
    cs.close("b")  # closing twice is harmless
    # "d" gets b's slot at its first frame: no reference, no history of b's may leak into it.
    cs.open("d", None)
    assert cs.streams["d"].slot is None  # an open stream holds no row before it has a frame
    gen = random_codes(10, seed=15)
    chunks = []
    for k, frame in enumerate(gen.tolist()):
        cs.push("d", frame)
        chunks += cs.collect({"d"} if k == len(gen) - 1 else set())
        if k == 0:
            assert cs.streams["d"].slot == b_slot
    assert cs.decoder.pool.num_used == 2  # d's row went back with its last chunk, before its close
    cs.close("d")
    assert np.abs(samples(chunks) - one_pass(tok, gen)).max() <= TOL
    for rid in ("a", "c"):
        cs.close(rid)
    assert cs.decoder.pool.num_used == 0 and not cs.streams


def test_cached_reference_prefill_gives_the_same_audio(tiny_model):
    torch.manual_seed(3)
    ref = torch.randint(0, 64, (9, 16))
    frames = torch.randint(0, 64, (6, 16)).tolist()
    stream = CodecStream(tiny_model.speech_tokenizer, (6,), 1920)
    outs = []
    for rid in ("first", "second"):  # the second open is served from the prefill cache
        stream.open(rid, ref)
        stream.streams[rid].prefill.result()
        for f in frames:
            stream.push(rid, f)
        (chunk,) = stream.collect(set())
        outs.append(chunk.samples.copy())
        stream.close(rid)
    assert len(stream._prefilled) == 1
    np.testing.assert_array_equal(outs[0], outs[1])


def listener_underruns(chunks: list, sample_rate: int) -> int:
    """Chunks that reach a listener after the audio before them has played out (playback starts with
    the first chunk; chunk i arrives at the i-th collect that emitted, ``step`` seconds apart)."""
    late, played_until = 0, None
    for c in chunks:
        if played_until is not None and c.arrived > played_until + 1e-9:
            late += 1
        start = c.arrived if played_until is None else max(played_until, c.arrived)
        played_until = start + c.num_frames * SPF / sample_rate
    return late


@pytest.mark.parametrize("icl", [False, True])
@pytest.mark.parametrize(("step", "expect_full_chunks"), [(0.01, True), (0.06, False), (0.1, True)])
def test_deadline_flush_keeps_listeners_fed_when_generation_is_slower_than_the_ramp(tok, step,
                                                                                    expect_full_chunks, icl):
    """At 0.01 s per 80 ms frame the schedule is kept; at 0.06 s (faster than real time, slower than
    the 2x the doubling ramp needs) chunks go early and no listener starves; at 0.1 s (slower than real
    time) nothing can keep the listener fed, and the schedule's cheaper large chunks stand."""
    gen = random_codes(40, seed=11)
    clock = FakeClock(step)
    cs = CodecStream(tok, SCHEDULE, SPF, clock=clock)
    ref = random_codes(12, seed=10) if icl else None
    cs.open("a", ref)
    if icl:
        cs.streams["a"].prefill.result()
    chunks = []
    for k, frame in enumerate(gen.tolist()):
        cs.push("a", frame)
        for c in cs.collect({"a"} if k == len(gen) - 1 else set()):
            c.arrived = clock.now
            chunks.append(c)
    sizes = [c.num_frames for c in chunks]
    assert sum(sizes) == 40 and samples(chunks).shape == (40 * SPF,)
    assert np.abs(samples(chunks) - one_pass(tok, gen, ref)).max() <= TOL
    if expect_full_chunks:
        check_chunks(chunks, 40, SCHEDULE)
    else:
        assert sizes[:4] != [1, 2, 4, 8]
    if step < SPF / tok.cfg.sample_rate:
        assert listener_underruns(chunks, tok.cfg.sample_rate) == 0, sizes


def test_deadline_flush_can_be_turned_off(tok):
    cs = CodecStream(tok, SCHEDULE, SPF, clock=FakeClock(0.06), deadline_flush=False)
    cs.open("a", None)
    chunks = []
    gen = random_codes(40, seed=11)
    for k, frame in enumerate(gen.tolist()):
        cs.push("a", frame)
        chunks += cs.collect({"a"} if k == len(gen) - 1 else set())
    check_chunks(chunks, 40, SCHEDULE)


# ---- lockstep: one call per step, bounded state, reference prefills beside the step -------------


def count_decoder_calls(tok: SpeechTokenizer) -> tuple[list[int], object]:
    """Counts the decoder's forward passes (the lockstep calls; prefills use latent/vocode directly)."""
    calls = [0]
    handle = tok.decoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def test_one_decoder_call_per_step_with_staggered_streams(tok):
    # mixed(): plain and ICL streams, different starts and lengths, so chunk phases differ at every
    # step (the landed design made one call per distinct pending count: several per step here).
    requests = mixed(seed=3)
    cs = CodecStream(tok, SCHEDULE, SPF, clock=FakeClock(0.001), capacity=8)
    calls, handle = count_decoder_calls(tok)
    per_step = []
    original = cs.collect

    def counted(final_ids):
        before = calls[0]
        out = original(final_ids)
        per_step.append(calls[0] - before)
        return out

    cs.collect = counted
    try:
        chunks = stream(tok, requests, cs=cs)
    finally:
        handle.remove()
    assert max(per_step) == 1 and calls[0] == cs.calls == len(per_step)  # every step has a frame here
    assert cs.frames_decoded == sum(len(gen) for _, gen, _ in requests.values())
    for rid, (ref, gen, _) in requests.items():
        check_chunks(chunks[rid], len(gen), SCHEDULE)
        assert np.abs(samples(chunks[rid]) - one_pass(tok, gen, ref)).max() <= TOL, rid


def test_same_shape_neighbours_leave_a_stream_bitwise_equal(tok):
    # Same bucket, same row, other neighbours (codes, reference lengths, so positions): the same floats.
    probe = (None, random_codes(14, seed=21), 0)
    runs = []
    for seed in (1, 2):
        others = {f"n{i}": (random_codes(4 * seed + i, seed=seed * 10 + i) if i % 2 else None,
                            random_codes(20, seed=seed * 10 + 5 + i), 0) for i in range(3)}
        runs.append(samples(stream(tok, {"probe": probe, **others})["probe"]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_the_state_pool_is_allocated_once_and_refuses_beyond_capacity(tok):
    cs = CodecStream(tok, (1,), SPF, capacity=2)
    pool = cs.decoder.pool
    storage = {k: t.data_ptr() for k, t in pool.tensors.items()}
    assert storage and all(t.shape[0] == 3 for t in pool.tensors.values())  # 2 streams + the scratch row
    assert pool.bytes_per_stream * 3 == pool.nbytes
    gens = {rid: random_codes(4, seed=30 + i) for i, rid in enumerate("abc")}
    for rid in gens:
        cs.open(rid, None)  # an open stream takes no row yet: a waiting request costs nothing here
    assert pool.num_used == 0
    out: dict[str, list] = {rid: [] for rid in gens}
    for k in range(4):
        for rid, gen in gens.items():
            cs.push(rid, gen[k].tolist())
        for c in cs.collect(set(gens) if k == 3 else set()):
            out[c.request_id].append(c)
        if k == 0:
            assert cs.take_failures() == [("c", "OVERLOADED", "codec: the codec holds state for 2 streams, all in use")]
        else:
            assert cs.take_failures() == []  # reported once; c's later frames are dropped, nothing raises
    assert out["c"] == []
    for rid in "ab":
        assert np.abs(samples(out[rid]) - one_pass(tok, gens[rid])).max() <= TOL
    assert {k: t.data_ptr() for k, t in pool.tensors.items()} == storage  # never reallocated
    for rid in "abc":
        cs.close(rid)
    cs.open("c", None)  # a closed stream's id starts afresh, and rows are free again
    cs.push("c", gens["c"][0].tolist())
    assert [ch.num_frames for ch in cs.collect({"c"})] == [1] and cs.take_failures() == []


def test_a_slow_reference_prefill_does_not_delay_other_streams(tok, monkeypatch):
    cs = CodecStream(tok, (1,), SPF, capacity=4)
    release = threading.Event()
    prefill = cs.decoder.prefill

    def slow_prefill(codes):
        assert release.wait(timeout=60)
        return prefill(codes)

    monkeypatch.setattr(cs.decoder, "prefill", slow_prefill)
    ref, icl, plain = random_codes(10, seed=40), random_codes(6, seed=41), random_codes(6, seed=42)
    cs.open("icl", ref)
    cs.open("plain", None)
    got: dict[str, list] = {"icl": [], "plain": []}
    for k in range(6):
        if k == 3:
            release.set()
            cs.streams["icl"].prefill.result()  # ready from here: it catches up in this step
        cs.push("icl", icl[k].tolist())
        cs.push("plain", plain[k].tolist())
        chunks = cs.collect({"icl", "plain"} if k == 5 else set())
        for c in chunks:
            got[c.request_id].append(c)
        assert [c.num_frames for c in chunks if c.request_id == "plain"] == [1]  # every step, prefill or not
        if k < 3:
            assert not any(c.request_id == "icl" for c in chunks)  # queued, not decoded without its state
    assert [c.num_frames for c in got["icl"]] == [4, 1, 1]  # the 3 queued frames and step 3's in one chunk
    assert np.abs(samples(got["icl"]) - one_pass(tok, icl, ref)).max() <= TOL
    assert np.abs(samples(got["plain"]) - one_pass(tok, plain)).max() <= TOL


def test_a_final_flush_waits_for_a_late_prefill(tok):
    cs = CodecStream(tok, (12,), SPF, capacity=2)
    ref, gen = random_codes(10, seed=43), random_codes(3, seed=44)
    cs.open("a", ref)
    chunks = []
    for k, frame in enumerate(gen.tolist()):
        cs.push("a", frame)
        chunks += cs.collect({"a"} if k == 2 else set())
    assert [c.num_frames for c in chunks] == [3]
    assert np.abs(samples(chunks) - one_pass(tok, gen, ref)).max() <= TOL


def test_a_failed_prefill_fails_its_stream_only(tok, monkeypatch):
    cs = CodecStream(tok, (1,), SPF, capacity=2)

    def broken(codes):
        raise RuntimeError("broken reference")

    monkeypatch.setattr(cs.decoder, "prefill", broken)
    cs.open("icl", random_codes(5, seed=45))
    cs.open("plain", None)
    cs.streams["icl"].prefill.exception()  # wait for it to fail
    for rid in ("icl", "plain"):
        cs.push(rid, random_codes(1, seed=46)[0].tolist())
    assert [c.request_id for c in cs.collect(set())] == ["plain"]
    assert cs.take_failures() == [("icl", "SYNTHESIS_ERROR", "codec: broken reference")]
