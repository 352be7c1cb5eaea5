"""The load generator against the real server app (over the fake engine from tests/server): it
speaks the protocol the server speaks, the synthetic voice is accepted, and the audio it counts is
the audio the engine made. Loopback only, bounded in time."""

from __future__ import annotations

import asyncio

import pytest

from bench.report import Slo, summarise
from bench.serve_load import ServeConfig, run_serve
from bench.texts import load_texts
from server.app import create_app
from server.settings import ServerSettings
from tests.bench.scripted_server import running
from tests.server.fake_engine import FakeEngine, frames_for


def test_closed_loop_against_the_server_with_an_inline_synthetic_voice():
    engine = FakeEngine(chunk_delay=0.01)
    texts = load_texts("en-short")[:3]
    with running(create_app(engine, ServerSettings())) as port:  # no voices, no default voice
        cfg = ServeConfig(url=f"ws://127.0.0.1:{port}", mode="concurrency", loads=[1, 2], duration_s=0.5,
                          texts=texts, language="english")
        info, levels = asyncio.run(asyncio.wait_for(run_serve(cfg), 30))
    assert info["voice_used"].startswith("inline x-vector") and info["model"]
    assert engine.voices_made == 1  # the same clip on every session: the server's cache made it once
    by_text = {t.id: t.text for t in texts}
    for level in levels:
        assert level.utterances and all(u.ok for u in level.utterances)
        for u in level.utterances:
            # The fake engine sends 1, 2, then 4 frames a chunk, one chunk per 10 ms.
            assert u.audio_s == pytest.approx(0.08 * frames_for(by_text[u.text_id]))
            assert [round(s / 0.08) for _, s in u.chunks][:2] == [1, 2]
            assert u.stop_reason == "eos"
        records = [u.record(0.0) for u in level.utterances]
        s = summarise(records, "concurrency", level.load, 0.5, level.elapsed_s, level.lag_s, level.setup_s, Slo())
        assert s["errors"] == {} and s["ttfa_ms"]["p50"] < 200
    assert {e.language for e in engine.submitted} == {"english"}


@pytest.mark.parametrize("text_input", ["live", "sentences"])
def test_word_by_word_input_times_from_the_first_word_and_reports_the_final_text_latency(text_input):
    engine = FakeEngine(chunk_delay=0.002)
    text = load_texts("en-short")[0]
    text2 = type(text)("two", "First sentence here. And a second one follows it.")
    with running(create_app(engine, ServerSettings())) as port:
        cfg = ServeConfig(url=f"ws://127.0.0.1:{port}", mode="concurrency", loads=[1], duration_s=0.3,
                          texts=[text, text2], language="english", text_input=text_input, word_interval_s=0.02)
        _, levels = asyncio.run(asyncio.wait_for(run_serve(cfg), 30))
    by_text = {text.id: text.text, "two": text2.text}
    (level,) = levels
    assert level.utterances and all(u.ok for u in level.utterances)
    for u in level.utterances:
        words = len(by_text[u.text_id].split())
        assert u.last_text_s >= 0.02 * (words - 1)  # the words went out on their schedule
        rec = u.record(0.0)
        assert 0 < rec["final_text_e2e_s"] < rec["e2e_s"]  # timed from the last text, not the first word
        assert rec["final_text_ttfa_s"] is not None and rec["final_text_ttfa_s"] <= rec["final_text_e2e_s"]
        if text_input == "live":  # one utterance: the whole text's audio
            assert u.audio_s == pytest.approx(0.08 * frames_for(by_text[u.text_id]))
    if text_input == "live":
        assert all(r.live for r in engine.submitted)
    else:  # each sentence its own request, all counted in the one utterance
        assert len(engine.submitted) > len(level.utterances) and not any(r.live for r in engine.submitted)
    s = summarise([u.record(0.0) for u in level.utterances], "concurrency", 1, 0.3, level.elapsed_s, level.lag_s,
                  level.setup_s, Slo())
    assert s["final_text_e2e_ms"]["p50"] > 0
