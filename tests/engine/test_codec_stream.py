"""The streaming codec decoder: chunks equal the one-pass decode, per request, whoever shares the batch."""

from __future__ import annotations

import dataclasses

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
    (more than the pool's first 4 slots, opened while others run: the pool grows mid-stream)."""
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
        cs.push(rid, random_codes(1, seed=14)[0].tolist())
    cs.collect(set())
    assert cs.decoder.pool.num_used == 3
    b_slot = cs.streams["b"].slot
    cs.close("b")
    assert "b" not in cs.streams and cs.decoder.pool.num_used == 2
    with pytest.raises(KeyError):
        cs.push("b", [0] * 16)
    cs.close("b")  # closing twice is harmless
    # "d" gets b's slot: no reference, no history of b's may leak into it.
    cs.open("d", None)
    assert cs.streams["d"].slot == b_slot
    gen = random_codes(10, seed=15)
    chunks = stream(tok, {"d": (None, gen, 0)}, cs=cs)["d"]
    assert cs.decoder.pool.num_used == 2
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
        for f in frames:
            stream.push(rid, f)
        (chunk,) = stream.collect(set())
        outs.append(chunk.samples.copy())
        stream.close(rid)
    assert len(stream.decoder._prefilled) == 1
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


@pytest.mark.parametrize(("step", "expect_full_chunks"), [(0.01, True), (0.06, False), (0.1, True)])
def test_deadline_flush_keeps_listeners_fed_when_generation_is_slower_than_the_ramp(tok, step,
                                                                                    expect_full_chunks):
    """At 0.01 s per 80 ms frame the schedule is kept; at 0.06 s (faster than real time, slower than
    the 2x the doubling ramp needs) chunks go early and no listener starves; at 0.1 s (slower than real
    time) nothing can keep the listener fed, and the schedule's cheaper large chunks stand."""
    gen = random_codes(40, seed=11)
    clock = FakeClock(step)
    cs = CodecStream(tok, SCHEDULE, SPF, clock=clock)
    cs.open("a", None)
    chunks = []
    for k, frame in enumerate(gen.tolist()):
        cs.push("a", frame)
        for c in cs.collect({"a"} if k == len(gen) - 1 else set()):
            c.arrived = clock.now
            chunks.append(c)
    sizes = [c.num_frames for c in chunks]
    assert sum(sizes) == 40
    assert np.abs(samples(chunks) - one_pass(tok, gen)).max() <= TOL
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
