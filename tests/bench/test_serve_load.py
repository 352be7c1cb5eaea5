"""The load generator against a scripted server with known delays: the TTFA, underruns and stall
time it measures are what was injected, to within a few milliseconds; closed and open loops keep
their schedules; errors and timeouts are counted. Loopback only, each test bounded in time."""

from __future__ import annotations

import asyncio
import base64
import io
import wave

import aiohttp
import pytest

from bench.report import Slo, summarise
from bench.serve_load import (
    ServeConfig,
    SessionPool,
    Target,
    poisson_arrivals,
    run_level,
    run_serve,
    speak_url,
    start_message,
)
from bench.texts import Text
from tests.bench.scripted_server import Script, ScriptedServer, scripted

LIMIT_S = 30.0
MEASURE_TOL_MS = 5.0  # generator's reading vs the moment the server actually sent (same clock)
SCHEDULE_TOL_MS = 15.0  # what the server actually did vs its script (its sleeps may overshoot on a busy box)
TEXTS = [Text("t:1", "Hello there."), Text("t:2", "A second sentence.")]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, LIMIT_S))


def target_for(server: ScriptedServer, timeout_s: float = 10.0) -> Target:
    return Target(f"ws://127.0.0.1:{server.port}/api/v1/speak", {"type": "start", "encoding": "pcm_s16le"},
                  timeout_s=timeout_s)


async def speak_once(server: ScriptedServer, text: Text, timeout_s: float = 10.0):
    async with aiohttp.ClientSession() as http:
        pool = SessionPool(http, target_for(server, timeout_s))
        try:
            session = await pool.acquire()
            return await session.speak(text, 0.0, timeout_s)  # clock0 = 0: start_s is the absolute send time
        finally:
            await pool.close()


def test_measured_ttfa_underrun_and_stall_match_the_injected_schedule():
    script = Script()
    with scripted(ScriptedServer(script)) as server:
        u = run(speak_once(server, TEXTS[0]))
    rec = u.record(0.0)
    sent = server.log[0]
    assert rec["ok"] and rec["error"] is None
    # TTFA: against what the server really did, and against the injected delay.
    true_ttfa_ms = 1000 * (sent.chunks[0] - u.start_s)
    assert rec["ttfa_s"] * 1000 == pytest.approx(true_ttfa_ms, abs=MEASURE_TOL_MS)
    assert rec["ttfa_s"] * 1000 == pytest.approx(script.first_ms, abs=SCHEDULE_TOL_MS)
    # Exactly the one deliberate late chunk, with its stall: it left 300 ms after the first chunk,
    # when the 80 + 160 ms before it had run out at 240 ms.
    assert rec["underruns"] == 1 and rec["late_chunks"] == [2]
    true_stall_ms = 1000 * (sent.chunks[2] - sent.chunks[0]) - 240.0
    assert rec["stall_s"] * 1000 == pytest.approx(true_stall_ms, abs=MEASURE_TOL_MS)
    assert rec["stall_s"] * 1000 == pytest.approx(60.0, abs=SCHEDULE_TOL_MS)
    # Every chunk's arrival, the audio total, end-to-end time and RTF.
    for (arrival, _), t in zip(u.chunks, sent.chunks, strict=True):
        assert 1000 * arrival == pytest.approx(1000 * (t - u.start_s), abs=MEASURE_TOL_MS)
    assert rec["audio_s"] == pytest.approx(0.08 * script.frames)
    assert rec["e2e_s"] * 1000 == pytest.approx(1000 * (sent.completed - u.start_s), abs=MEASURE_TOL_MS)
    assert rec["rtf"] == pytest.approx(rec["e2e_s"] / rec["audio_s"])
    assert rec["server_ttfa_ms"] == script.first_ms and rec["stop_reason"] == "eos"


def test_preroll_absorbs_a_stall_shorter_than_it():
    with scripted() as server:
        u = run(speak_once(server, TEXTS[0]))
    assert u.record(0.0)["underruns"] == 1
    assert u.record(0.1)["underruns"] == 0  # a 100 ms jitter buffer hides the 60 ms gap


def test_on_time_schedule_has_no_underrun():
    script = Script(first_ms=50.0, chunks=((0, 1), (40, 2), (200, 4)), complete_ms=210.0)
    with scripted(ScriptedServer(script)) as server:
        rec = run(speak_once(server, TEXTS[0])).record(0.0)
    assert rec["ok"] and rec["underruns"] == 0 and rec["stall_s"] == 0.0
    assert rec["ttfa_s"] * 1000 == pytest.approx(50.0, abs=SCHEDULE_TOL_MS)


def test_closed_loop_keeps_its_sessions_busy_and_every_utterance_shows_the_injected_delays():
    with scripted() as server:
        level = run(run_level(target_for(server), "concurrency", 2, TEXTS, 1.0, seed=0))
    records = [u.record(0.0) for u in level.utterances]
    # Each utterance takes ~560 ms: two sessions back to back for 1 s start 2 each (at 0 and ~0.56 s).
    assert len(records) == 4 and {r["session"] for r in records} == {0, 1}
    assert len(level.setup_s) == 2  # sessions were opened once, before the clock, and reused
    for r in records:
        assert r["ok"] and r["underruns"] == 1
        assert r["ttfa_s"] * 1000 == pytest.approx(150.0, abs=SCHEDULE_TOL_MS)
        assert r["stall_s"] * 1000 == pytest.approx(60.0, abs=SCHEDULE_TOL_MS)
    s = summarise(records, "concurrency", 2, 1.0, level.elapsed_s, level.lag_s, level.setup_s, Slo())
    assert s["ok"] == 4 and s["underrun_share"] == 1.0 and s["goodput"]["share"] == 0.0
    assert s["ttfa_ms"]["p99"] == pytest.approx(150.0, abs=SCHEDULE_TOL_MS)
    assert s["stall_ms"]["total"] == pytest.approx(4 * 60.0, abs=4 * SCHEDULE_TOL_MS)
    lenient = summarise(records, "concurrency", 2, 1.0, level.elapsed_s, level.lag_s, level.setup_s,
                        Slo(ttfa_ms=200.0, max_underruns=1))
    assert lenient["goodput"]["share"] == 1.0
    assert level.elapsed_s == pytest.approx(0.56 * 2, abs=0.15)


def test_open_loop_sends_on_the_seeded_poisson_schedule():
    arrivals = poisson_arrivals(6.0, 1.5, seed=7)
    assert arrivals == poisson_arrivals(6.0, 1.5, seed=7) and arrivals != poisson_arrivals(6.0, 1.5, seed=8)
    assert all(0 <= a < 1.5 for a in arrivals) and arrivals == sorted(arrivals)
    long_run = poisson_arrivals(50.0, 100.0, seed=1)
    assert len(long_run) / 100.0 == pytest.approx(50.0, rel=0.05)
    with scripted() as server:
        level = run(run_level(target_for(server), "rate", 6.0, TEXTS, 1.5, seed=7))
    starts = [u.start_s for u in level.utterances]
    assert len(starts) == len(arrivals)
    for got, want in zip(starts, arrivals, strict=True):
        assert got == pytest.approx(want, abs=SCHEDULE_TOL_MS / 1000)
    assert all(u.ok for u in level.utterances)


def test_errors_timeouts_and_refused_sessions_are_counted():
    texts = [Text("bad:1", "please FAIL"), Text("hang:1", "HANG up")]
    with scripted() as server:
        failed = run(speak_once(server, texts[0]))
        hung = run(speak_once(server, texts[1], timeout_s=0.5))
    assert failed.error == "SYNTHESIS_ERROR" and not failed.ok
    assert hung.error == "TIMEOUT" and len(hung.chunks) == 1
    with scripted(ScriptedServer(max_sessions=1)) as server:
        level = run(run_level(target_for(server), "concurrency", 2, TEXTS, 0.5, seed=0))
    errors = [u.error for u in level.utterances if u.error]
    assert errors and set(errors) == {"OVERLOADED"}
    assert any(u.ok for u in level.utterances)  # the session that got in kept speaking


def test_without_a_voice_sessions_clone_the_builtin_synthetic_clip():
    with scripted() as server:
        cfg = ServeConfig(url=f"ws://127.0.0.1:{server.port}", mode="concurrency", loads=[1], duration_s=0.3,
                          texts=TEXTS, warmup=1)
        info, levels = run(run_serve(cfg))
        start = server.starts[0]
    assert info["voice_used"].startswith("inline x-vector") and levels[0].utterances
    voice = start["voice"]
    assert voice["x_vector_only"] is True and "ref_text" not in voice
    with wave.open(io.BytesIO(base64.b64decode(voice["ref_audio"]))) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1 and w.getnframes() == 3 * 24000
    # A named voice, or the server's default, replaces the clip.
    assert start_message(ServeConfig("ws://x", "rate", [1], 1, TEXTS, voice="anna"), {})[0]["voice"] == "anna"
    msg, how = start_message(ServeConfig("ws://x", "rate", [1], 1, TEXTS), {"default_voice": "ben"})
    assert "voice" not in msg and "ben" in how


def test_speak_url_defaults_the_path():
    assert speak_url("ws://127.0.0.1:8000") == "ws://127.0.0.1:8000/api/v1/speak"
    assert speak_url("wss://h/custom/speak") == "wss://h/custom/speak"
    with pytest.raises(ValueError):
        speak_url("http://127.0.0.1:8000")
