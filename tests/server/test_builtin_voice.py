"""Out of the box: the built-in voice (server/default_voice/) answers requests that name no voice or an
OpenAI voice name, and names and languages are matched the same way over HTTP and the WebSocket."""

from __future__ import annotations

import hashlib
import re

import pytest
import soundfile as sf

from server.state import BUILTIN_VOICE, BUILTIN_VOICE_DIR
from tests.server.conftest import recv_json, serve, wav_bytes
from tests.server.fake_engine import FakeEngine

VOICES = {"anna": wav_bytes(1.0)}
TEXT = "Out of the box."


def test_the_shipped_clip_is_what_its_manifest_says():
    manifest = (BUILTIN_VOICE_DIR / "MANIFEST.md").read_text()
    clip = BUILTIN_VOICE_DIR / "ref.wav"
    info = sf.info(clip)
    assert info.samplerate == 24000 and info.channels == 1 and info.subtype == "PCM_16"
    assert f"{info.duration:.2f} s" in manifest
    assert hashlib.sha256(clip.read_bytes()).hexdigest() in manifest
    assert (BUILTIN_VOICE_DIR / "ref_text.txt").read_text().strip() in manifest
    assert "Licence" in manifest and "espeak-ng" in manifest


async def test_no_voice_and_openai_names_get_the_builtin_voice_without_a_default_voice():
    engine = FakeEngine()
    async with serve(engine, voices=VOICES) as client:
        for body in ({}, {"voice": "alloy"}, {"voice": "Shimmer"}, {"voice": {"id": "echo"}}):
            r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "response_format": "pcm",
                                                             **body})
            assert r.status == 200, (body, await r.text())
            await r.read()
            assert engine.submitted[-1].voice.is_icl  # cloned from the clip and its transcript
        assert engine.voices_made == 2  # anna's, and the built-in one once: then from the cache
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start"})
        assert (await recv_json(ws))["voice"] == BUILTIN_VOICE
        await ws.close()
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "nobody"})
        assert r.status == 404  # a name that is neither registered nor OpenAI's is still an error


async def test_a_configured_default_voice_still_wins():
    engine = FakeEngine()
    async with serve(engine, voices=VOICES, default_voice="anna") as client:
        for start in ({"type": "start"}, {"type": "start", "voice": "alloy"}):
            ws = await client.ws_connect("/api/v1/speak")
            await ws.send_json(start)
            assert (await recv_json(ws))["voice"] == "anna"
            await ws.close()


@pytest.mark.parametrize("given, language", [("English", "english"), ("en", "english"), ("EN", "english"),
                                             (" zh ", "chinese"), ("", "auto"), ("Auto", "auto")])
async def test_language_names_and_codes_match_case_insensitively_everywhere(given, language):
    engine = FakeEngine()
    async with serve(engine, voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "anna",
                                                         "language": given, "response_format": "pcm"})
        assert r.status == 200, await r.text()
        await r.read()
        assert engine.submitted[-1].language == language
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna", "language": given})
        assert (await recv_json(ws))["language"] == language
        await ws.close()


async def test_voice_ids_fold_case_over_the_websocket_as_over_http():
    async with serve(voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": " Anna "})
        ready = await recv_json(ws)
        assert ready["type"] == "ready" and ready["voice"] == "anna", ready
        await ws.close()
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "ANNA",
                                                         "response_format": "pcm"})
        assert r.status == 200


def test_builtin_name_cannot_be_a_voice_id():
    from server.protocol import VOICE_ID

    assert not VOICE_ID.match(BUILTIN_VOICE) and re.fullmatch(r"_\w+", BUILTIN_VOICE)
