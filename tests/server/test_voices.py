"""The voice registry over HTTP and on disk, its cache, and the sentence splitter."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest
import soundfile as sf

from server.sentences import SentenceBuffer
from server.voices import PromptCache
from tests.server.conftest import b64, collect_utterance, recv_json, serve, wav_bytes
from tests.server.fake_engine import FakeEngine


def form(audio: bytes | None = None, filename: str = "clip.flac", **fields) -> aiohttp.FormData:
    f = aiohttp.FormData()
    if audio is not None:
        f.add_field("audio", audio, filename=filename, content_type="application/octet-stream")
    for k, v in fields.items():
        f.add_field(k, v)
    return f


async def test_create_list_get_delete_and_reload_from_disk(tmp_path):
    engine = FakeEngine()
    clip = wav_bytes(1.5, sr=44100, fmt="FLAC")
    async with serve(engine, voices_dir=tmp_path) as client:
        r = await client.post("/api/v1/voices", data=form(clip, name="Anna Smith", transcript="Hello, I am Anna.",
                                                          language="English"))
        assert r.status == 201, await r.text()
        info = await r.json()
        assert info["voice_id"] == "anna-smith" and info["speaker"] == "Anna Smith" and info["language"] == "english"
        assert info["transcript"] == "Hello, I am Anna." and not info["x_vector_only"] and info["duration_s"] == 1.5
        folder = tmp_path / "anna-smith"
        manifest = json.loads((folder / "manifest.json").read_text())
        # Stored as only as large as needed: 16-bit 24 kHz mono WAV, whatever was uploaded (#13 item 7).
        stored = sf.info(str(folder / "reference.wav"))
        assert manifest["ref_audio_file"] == "reference.wav" and (stored.samplerate, stored.channels) == (24000, 1)
        assert stored.subtype == "PCM_16" and stored.frames == 36000
        assert (folder / "prompt.safetensors").is_file()
        r = await client.post("/api/v1/voices", data=form(wav_bytes(), name="x", voice_id="bob", x_vector_only="true"))
        assert r.status == 201
        listing = await (await client.get("/api/v1/voices")).json()
        assert [v["voice_id"] for v in listing["voices"]] == ["anna-smith", "bob"]
        assert (await (await client.get("/api/v1/voices/bob")).json())["x_vector_only"] is True
    assert engine.voices_made == 2
    async with serve(engine, voices_dir=tmp_path) as client:  # a restart: voices come back from disk
        listing = await (await client.get("/api/v1/voices")).json()
        assert [v["voice_id"] for v in listing["voices"]] == ["anna-smith", "bob"]
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna-smith"})
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send_json({"type": "speak", "text": "From disk."})
        assert (await collect_utterance(ws))[1]["type"] == "complete"
        assert engine.voices_made == 2  # loaded, not recomputed
        r = await client.delete("/api/v1/voices/bob")
        assert r.status == 200 and not (tmp_path / "bob").exists()
        assert (await client.get("/api/v1/voices/bob")).status == 404
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


async def test_json_upload_and_in_memory_registry():
    async with serve() as client:
        r = await client.post("/api/v1/voices", json={"name": "Cleo", "ref_audio": b64(wav_bytes()),
                                                      "x_vector_only": True})
        assert r.status == 201 and (await r.json())["voice_id"] == "cleo"
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "cleo"})
        assert (await recv_json(ws))["type"] == "ready"


@pytest.mark.parametrize("data,code,status", [
    (form(wav_bytes(), name="a", transcript="t", voice_id="../etc"), "INVALID_VOICE_ID", 400),
    (form(wav_bytes(), name="a", transcript="t", voice_id="UPPER"), "INVALID_VOICE_ID", 400),
    (form(wav_bytes(), name="!!!", transcript="t"), "INVALID_VOICE_ID", 400),
    (form(wav_bytes(), name="a"), "INVALID_MESSAGE", 400),  # ICL needs a transcript
    (form(wav_bytes(), name="a", x_vector_only="maybe"), "INVALID_MESSAGE", 400),
    (form(None, name="a", transcript="t"), "INVALID_AUDIO", 400),
    (form(b"\x00" * 400, name="a", transcript="t"), "INVALID_AUDIO", 400),
    (form(wav_bytes()[:60], name="a", transcript="t"), "INVALID_AUDIO", 400),
    (form(wav_bytes(31.0, sr=8000), name="a", transcript="t"), "AUDIO_TOO_LONG", 400),
    (form(wav_bytes(), name="a", transcript="t", language="klingon"), "UNSUPPORTED", 400),
])
async def test_upload_errors(data, code, status):
    async with serve() as client:
        r = await client.post("/api/v1/voices", data=data)
        assert r.status == status and (await r.json())["code"] == code, await r.text()


async def test_upload_size_cap_duplicates_and_lookup_errors():
    async with serve(max_upload_bytes=20000, voices={"anna": wav_bytes(0.5)}) as client:
        r = await client.post("/api/v1/voices", data=form(wav_bytes(2.0), name="big", x_vector_only="1"))
        assert r.status == 413 and (await r.json())["code"] == "AUDIO_TOO_LARGE"
        r = await client.post("/api/v1/voices", data=form(wav_bytes(0.3), name="anna", x_vector_only="1"))
        assert r.status == 409 and (await r.json())["code"] == "VOICE_EXISTS"
        for bad in ("nobody", "..%2F..%2Fetc", "A" * 80):
            r = await client.get(f"/api/v1/voices/{bad}")
            assert r.status == 404 and (await r.json())["code"] == "VOICE_NOT_FOUND"
        assert (await client.delete("/api/v1/voices/nobody")).status == 404
        r = await client.post("/api/v1/voices", data=b"raw", headers={"Content-Type": "text/plain"})
        assert r.status == 400 and (await r.json())["code"] == "INVALID_MESSAGE"


async def test_broken_voice_folders_are_skipped(tmp_path):
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    async with serve(voices_dir=tmp_path) as client:
        assert (await (await client.get("/api/v1/voices")).json())["voices"] == []


async def test_voice_routes_need_the_token_when_configured():
    async with serve(auth_tokens=frozenset({"t"})) as client:
        assert (await client.get("/api/v1/voices")).status == 401
        assert (await client.get("/api/v1/voices", headers={"Authorization": "Bearer t"})).status == 200
        assert (await client.get("/api/v1/info")).status == 200  # the page needs it to ask for a token
        r = await client.post("/api/v1/voices", data=form(wav_bytes(), name="x", x_vector_only="1"),
                              headers={"Origin": "https://evil.example", "Authorization": "Bearer t"})
        assert r.status == 403 and (await r.json())["code"] == "FORBIDDEN"


def test_prompt_cache_is_lru_with_ttl(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    c = PromptCache(size=2, ttl_s=10)
    c.put("a", "A")
    c.put("b", "B")
    assert c.get("a") == "A"
    c.put("c", "C")  # evicts b, the least recently used
    assert c.get("b") is None and c.get("a") == "A" and c.get("c") == "C"
    now[0] += 11
    assert c.get("a") is None and len(c) == 1


def test_sentence_buffer():
    b = SentenceBuffer(max_chars=40)
    assert b.push("Pi is 3.") == []
    assert b.push("14 roughly. Next") == ["Pi is 3.14 roughly."]
    assert b.push(" one! ") == []  # "Next one!" is short: held to merge with what follows
    assert b.push("And more words here. ") == ["Next one! And more words here."]
    assert b.push("你好世界，今天天气很好。明天") == ["你好世界，今天天气很好。"]
    assert b.flush() == "明天" and b.flush() is None
    out = b.push("word " * 20)
    assert all(len(p) <= 40 for p in out) and len(b) <= 40
    b.clear()
    assert b.push("line one\nline two\n") == ["line one", "line two"]
