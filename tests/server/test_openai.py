"""POST /v1/audio/speech: formats, streaming, SSE, extensions and errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import wave

import numpy as np
import pytest
import soundfile as sf

from engine.api import Request
from engine.sampling import SamplingParams
from server.pcm import encode_pcm
from server.state import STATE
from tests.server.conftest import b64, serve, wav_bytes
from tests.server.fake_engine import FakeEngine, fake_audio

VOICES = {"anna": wav_bytes(1.0)}
TEXT = "An OpenAI shaped request."


async def want(client, text=TEXT, voice="anna", **req) -> np.ndarray:
    return fake_audio(Request(text=text, voice=await client.app[STATE].voices.prompt(voice), **req))


async def test_pcm_streams_s16le_equal_to_the_engine_output():
    async with serve(FakeEngine(chunk_delay=0.01), voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "anna",
                                                         "response_format": "pcm"})
        assert r.status == 200 and r.headers["Content-Type"] == "audio/pcm" and r.headers["X-Sample-Rate"] == "24000"
        chunks = [c async for c in r.content.iter_any()]
        assert len(chunks) > 1  # arrived as generated, not as one body
        assert b"".join(chunks) == encode_pcm(await want(client), "pcm_s16le")


async def test_whole_wav_has_true_sizes_so_wave_reads_exactly_the_samples_sent():
    async with serve(FakeEngine(chunk_delay=0.01), voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "anna",
                                                         "response_format": "wav"})
        body = await r.read()
        want_pcm = encode_pcm(await want(client), "pcm_s16le")
        assert r.status == 200 and r.headers["Content-Type"] == "audio/wav"
        assert int(r.headers["Content-Length"]) == len(body) == 44 + len(want_pcm)
        assert struct.unpack("<I", body[4:8])[0] == 36 + len(want_pcm)  # RIFF size
        with wave.open(io.BytesIO(body)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
            assert w.getnframes() == len(want_pcm) // 2
            assert w.readframes(w.getnframes() + 1) == want_pcm


async def test_pcm_can_come_whole_with_its_length():
    async with serve(FakeEngine(chunk_delay=0.01), voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"input": TEXT, "voice": "anna", "response_format": "pcm",
                                                         "stream": False})
        body = await r.read()
        assert r.headers["Content-Type"] == "audio/pcm" and int(r.headers["Content-Length"]) == len(body)
        assert body == encode_pcm(await want(client), "pcm_s16le")


async def test_streamed_wav_on_request_has_an_unknown_length_header_then_pcm():
    async with serve(FakeEngine(chunk_delay=0.01), voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "anna",
                                                         "response_format": "wav", "stream": True})
        chunks = [c async for c in r.content.iter_any()]
        assert len(chunks) > 1 and "Content-Length" not in r.headers  # arrived as generated
        body = b"".join(chunks)
        assert struct.unpack("<I", body[40:44])[0] == 0xFFFFFFFF
        assert r.headers["Content-Type"] == "audio/wav" and body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt "
        assert struct.unpack("<HHI", body[20:28]) == (1, 1, 24000)
        assert body[44:] == encode_pcm(await want(client), "pcm_s16le")
        audio, sr = sf.read(io.BytesIO(body), dtype="int16")  # players accept the "unknown length" header
        assert sr == 24000 and len(audio) == len(body[44:]) // 2


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
async def test_file_formats_decode(fmt):
    async with serve(voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "anna",
                                                         "response_format": fmt})
        assert r.status == 200, await r.text()
        audio, sr = sf.read(io.BytesIO(await r.read()))
        assert sr in (24000, 48000) and len(audio) > 0


async def test_default_format_is_mp3_like_openai():
    async with serve(voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "anna"})
        assert r.headers["Content-Type"] == "audio/mpeg"


async def test_sse_delta_and_done_events():
    async with serve(voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "anna",
                                                         "response_format": "pcm", "stream_format": "sse"})
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [json.loads(line[6:]) for line in (await r.text()).split("\n\n") if line.startswith("data: ")]
        assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
        assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] == len(TEXT) // 3
        pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
        assert pcm == encode_pcm(await want(client), "pcm_s16le")


async def test_extensions_inline_voice_seed_language_and_openai_voice_names():
    engine = FakeEngine()
    async with serve(engine, voices=VOICES, default_voice="anna") as client:
        r = await client.post("/v1/audio/speech", json={
            "model": "x", "input": TEXT, "voice": "ignored", "response_format": "pcm", "language": "German",
            "ref_audio": b64(wav_bytes(0.5)), "ref_text": "A clip.", "seed": 11})
        assert r.status == 200, await r.text()
        await r.read()
        req = engine.submitted[-1]
        assert req.language == "german" and req.sampling == SamplingParams(seed=11) and req.voice.is_icl
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": "alloy",
                                                         "response_format": "pcm"})
        assert await r.read() == encode_pcm(await want(client), "pcm_s16le")  # alloy → the default voice
        r = await client.post("/v1/audio/speech", json={"model": "x", "input": TEXT, "voice": {"id": "anna"},
                                                         "response_format": "pcm"})
        assert r.status == 200


@pytest.mark.parametrize("body,status,code", [
    ({"model": "x", "voice": "anna"}, 400, "INVALID_MESSAGE"),
    ({"model": "x", "input": "", "voice": "anna"}, 400, "INVALID_MESSAGE"),
    ({"model": "x", "input": "x" * 4097, "voice": "anna"}, 400, "TEXT_TOO_LONG"),
    ({"model": "x", "input": TEXT, "voice": "nobody"}, 404, "VOICE_NOT_FOUND"),
    ({"model": "x", "input": TEXT, "voice": "anna", "speed": 1.5}, 400, "UNSUPPORTED"),
    ({"model": "x", "input": TEXT, "voice": "anna", "response_format": "aac"}, 400, "UNSUPPORTED"),
    ({"model": "x", "input": TEXT, "voice": "anna", "response_format": "wav", "stream_format": "sse"}, 400,
     "UNSUPPORTED"),
    ({"model": "x", "input": TEXT, "voice": "anna", "response_format": "mp3", "stream": True}, 400, "UNSUPPORTED"),
    ({"model": "x", "input": TEXT, "voice": "anna", "response_format": "pcm", "stream_format": "sse",
      "stream": False}, 400, "UNSUPPORTED"),
    ({"model": "x", "input": TEXT, "voice": "anna", "response_format": "wav", "stream": "yes"}, 400,
     "INVALID_MESSAGE"),
    ({"model": "x", "input": TEXT, "voice": "anna", "instructions": "whisper"}, 400, "UNSUPPORTED"),
    ({"model": "x", "input": TEXT, "voice": "anna", "language": "klingon"}, 400, "UNSUPPORTED"),
    ({"model": "x", "input": TEXT, "ref_audio": "@@@", "x_vector_only": True}, 400, "INVALID_AUDIO"),
    ({"model": "x", "input": TEXT, "ref_audio": b64(b"not audio at all"), "x_vector_only": True}, 400,
     "INVALID_AUDIO"),
    ({"model": "x", "input": 5, "voice": "anna"}, 400, "INVALID_MESSAGE"),
    ([1, 2], 400, "INVALID_MESSAGE"),
])
async def test_errors(body, status, code):
    async with serve(voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json=body)
        assert r.status == status and (await r.json())["code"] == code


async def test_bad_json_unauthorized_and_engine_failure():
    async with serve(voices=VOICES, auth_tokens=frozenset({"tok"})) as client:
        r = await client.post("/v1/audio/speech", data=b"{oops", headers={"Authorization": "Bearer tok"})
        assert r.status == 400 and (await r.json())["code"] == "INVALID_MESSAGE"
        r = await client.post("/v1/audio/speech", json={"input": TEXT, "voice": "anna"})
        assert r.status == 401 and (await r.json())["code"] == "UNAUTHORIZED"
        r = await client.post("/v1/audio/speech", json={"input": "FAIL now", "voice": "anna", "response_format": "mp3"},
                              headers={"Authorization": "Bearer tok"})
        assert r.status == 500 and (await r.json())["code"] == "SYNTHESIS_ERROR"
    async with serve(no_engine=True) as client:
        r = await client.post("/v1/audio/speech", json={"input": TEXT, "voice": "anna"})
        assert r.status == 503 and (await r.json())["code"] == "TTS_UNAVAILABLE"


async def test_http_client_gone_cancels_the_request():
    engine = FakeEngine(chunk_delay=0.02)
    async with serve(engine, voices=VOICES) as client:
        r = await client.post("/v1/audio/speech", json={"input": "q" * 900, "voice": "anna", "response_format": "pcm"})
        await r.content.readany()
        assert engine.stats().running == 1
        r.connection.transport.abort()
        for _ in range(200):
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0


async def test_an_engine_that_raises_is_a_synthesis_error():
    class Raising(FakeEngine):
        def submit(self, request):
            raise RuntimeError("kaboom")

    async with serve(Raising(), voices=VOICES) as client:
        for fmt in ("pcm", "mp3"):
            r = await client.post("/v1/audio/speech", json={"input": TEXT, "voice": "anna", "response_format": fmt})
            assert r.status == 500 and (await r.json())["code"] == "SYNTHESIS_ERROR"
        assert client.app[STATE].active == 0
