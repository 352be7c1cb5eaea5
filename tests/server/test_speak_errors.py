"""Every error code of the WebSocket protocol; an error about one message never ends the session."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import WSMsgType, WSServerHandshakeError

from server.app import attach_engine
from tests.server.conftest import b64, collect_utterance, recv_json, serve, wav_bytes
from tests.server.fake_engine import FakeEngine

VOICES = {"anna": wav_bytes(1.0)}


async def still_works(ws) -> None:
    await ws.send_json({"type": "speak", "id": "ok", "text": "Still working."})
    _, done, _ = await collect_utterance(ws)
    assert done["type"] == "complete" and done["id"] == "ok"


async def error_for(ws, message) -> dict:
    await (ws.send_str(message) if isinstance(message, str) else ws.send_json(message))
    err = await recv_json(ws)
    assert err["type"] == "error", err
    return err


BEFORE_START = [
    ("{not json", "INVALID_MESSAGE"),
    ("[1, 2]", "INVALID_MESSAGE"),
    ('"start"', "INVALID_MESSAGE"),
    ({"text": "no type"}, "INVALID_MESSAGE"),
    ({"type": 5}, "INVALID_MESSAGE"),
    ({"type": "dance"}, "UNSUPPORTED"),
    ({"type": "speak", "id": "s", "text": "too early"}, "INVALID_MESSAGE"),
    ({"type": "append", "text": "too early"}, "INVALID_MESSAGE"),
    ({"type": "flush"}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": "nobody"}, "VOICE_NOT_FOUND"),
    ({"type": "start", "voice": "../../etc/passwd"}, "VOICE_NOT_FOUND"),
    ({"type": "start", "voice": "anna", "encoding": "mp3"}, "UNSUPPORTED"),
    ({"type": "start", "voice": "anna", "language": "klingon"}, "UNSUPPORTED"),
    ({"type": "start", "voice": "anna", "priority": "urgent"}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": "anna", "max_frames": 0}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": "anna", "sampling": {"temperature": 0}}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": "anna", "sampling": {"top_p": 1.5}}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": "anna", "sampling": {"seed": "x"}}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": "anna", "sampling": {"greedy": 1}}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": "anna", "sampling": {"temprature": 0.5}}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": "anna", "speed": 2}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": 42}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": {"ref_text": "no audio"}}, "INVALID_MESSAGE"),
    ({"type": "start", "voice": {"ref_audio": b64(wav_bytes())}}, "INVALID_MESSAGE"),  # ICL needs ref_text
    ({"type": "start", "voice": {"ref_audio": "!!not base64!!", "x_vector_only": True}}, "INVALID_AUDIO"),
    ({"type": "start", "voice": {"ref_audio": b64(b"RIFF garbage that is no audio"), "x_vector_only": True}},
     "INVALID_AUDIO"),
    ({"type": "start", "voice": {"ref_audio": "", "x_vector_only": True}}, "INVALID_AUDIO"),
    ({"type": "start", "voice": {"ref_audio": b64(wav_bytes(31.0, sr=8000)), "x_vector_only": True}},
     "AUDIO_TOO_LONG"),
]


async def test_every_bad_message_before_start_gets_its_code_and_the_session_survives():
    async with serve(voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        for message, code in BEFORE_START:
            err = await error_for(ws, message)
            assert err["code"] == code, (message, err)
            assert err["message"]
        await ws.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws))["type"] == "ready"
        await still_works(ws)


async def test_audio_over_the_byte_limit():
    async with serve(voices=VOICES, max_upload_bytes=1000) as client:
        ws = await client.ws_connect("/api/v1/speak")
        err = await error_for(ws, {"type": "start", "voice": {"ref_audio": b64(wav_bytes()), "x_vector_only": True}})
        assert err["code"] == "AUDIO_TOO_LARGE"


async def test_inline_voice_from_base64_and_data_url():
    engine = FakeEngine()
    async with serve(engine) as client:
        for audio in (b64(wav_bytes(0.8)), "data:audio/wav;base64," + b64(wav_bytes(0.8))):
            ws = await client.ws_connect("/api/v1/speak")
            await ws.send_json({"type": "start", "voice": {"ref_audio": audio, "ref_text": "Reference words."}})
            ready = await recv_json(ws)
            assert ready["type"] == "ready" and ready["voice"] is None
            await still_works(ws)
            await ws.close()
        assert engine.voices_made == 1  # the same clip twice: prepared once, then cached


async def test_errors_after_start_carry_the_utterance_id():
    async with serve(voices=VOICES, max_text_chars=50) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        cases = [
            ({"type": "speak", "id": "big", "text": "x" * 51}, "TEXT_TOO_LONG", "big"),
            ({"type": "speak", "id": "empty", "text": "   "}, "INVALID_MESSAGE", "empty"),
            ({"type": "speak", "id": "n", "text": 5}, "INVALID_MESSAGE", "n"),
            ({"type": "speak", "id": {"x": 1}, "text": "a"}, "INVALID_MESSAGE", None),
            ({"type": "speak", "id": "extra", "text": "a", "voice": "anna"}, "INVALID_MESSAGE", "extra"),
            ({"type": "append", "text": 3}, "INVALID_MESSAGE", None),
            ({"type": "start", "voice": "anna"}, "INVALID_MESSAGE", None),  # already started
            ({"type": "cancel", "now": True}, "INVALID_MESSAGE", None),
        ]
        for message, code, id in cases:
            err = await error_for(ws, message)
            assert err["code"] == code and err.get("id") == id, (message, err)
        await ws.send_bytes(b"\x00\x01")
        assert (await recv_json(ws))["code"] == "UNSUPPORTED"
        await still_works(ws)


async def test_append_without_sentence_end_is_capped():
    async with serve(voices=VOICES, max_append_chars=100) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        err = await error_for(ws, {"type": "append", "text": "a" * 101})
        assert err["code"] == "TEXT_TOO_LONG"


async def test_synthesis_error_fails_one_utterance_only():
    async with serve(voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        await ws.send_json({"type": "speak", "id": "bad", "text": "Please FAIL in the middle of this."})
        await ws.send_json({"type": "speak", "id": "next", "text": "The next one is fine."})
        _, err, _ = await collect_utterance(ws)
        assert err["type"] == "error" and err["code"] == "SYNTHESIS_ERROR" and err["id"] == "bad"
        _, done, _ = await collect_utterance(ws)
        assert done["type"] == "complete" and done["id"] == "next"


async def test_queue_limit_is_overloaded_for_that_message():
    async with serve(FakeEngine(chunk_delay=0.05), voices=VOICES, max_queued_utterances=2) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        for i in range(4):
            await ws.send_json({"type": "speak", "id": i, "text": "Some words to say."})
        err = await recv_json(ws)
        assert err["code"] == "OVERLOADED" and err["id"] in (2, 3)  # 0 may or may not have left the queue


async def test_too_many_sessions_is_overloaded_at_start_with_close_1013():
    async with serve(voices=VOICES, max_sessions=1) as client:
        ws1 = await client.ws_connect("/api/v1/speak")
        ws2 = await client.ws_connect("/api/v1/speak")  # connecting takes no slot: ws2 stays open, idle
        with pytest.raises(asyncio.TimeoutError):
            await ws2.receive(timeout=0.2)
        await ws1.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws1))["type"] == "ready"
        await ws2.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws2))["code"] == "OVERLOADED"
        msg = await ws2.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1013
        await ws1.close()
        for _ in range(50):  # the slot is released when the handler returns
            ws3 = await client.ws_connect("/api/v1/speak")
            await ws3.send_json({"type": "start", "voice": "anna"})
            if (await recv_json(ws3))["type"] == "ready":
                break
        else:
            raise AssertionError("slot never freed")


async def test_a_start_that_fails_gives_its_slot_back():
    async with serve(voices=VOICES, max_sessions=1) as client:
        ws1 = await client.ws_connect("/api/v1/speak")
        await ws1.send_json({"type": "start", "voice": "nobody"})
        assert (await recv_json(ws1))["code"] == "VOICE_NOT_FOUND"
        ws2 = await client.ws_connect("/api/v1/speak")
        await ws2.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws2))["type"] == "ready"  # the failed start's slot was not kept
        await ws1.send_json({"type": "start", "voice": "anna"})  # same socket, again: now the server is full
        assert (await recv_json(ws1))["code"] == "OVERLOADED"
        await ws2.close()


async def test_connections_beyond_the_cap_are_overloaded_with_close_1013_before_start():
    async with serve(voices=VOICES, max_connections=2) as client:
        idle = [await client.ws_connect("/api/v1/speak") for _ in range(2)]
        third = await client.ws_connect("/api/v1/speak")
        err = await recv_json(third)
        assert err["code"] == "OVERLOADED" and "connections" in err["message"], err
        msg = await third.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1013
        await idle[0].close()
        for _ in range(50):  # the connection is given back when its handler returns
            ws = await client.ws_connect("/api/v1/speak")
            await ws.send_json({"type": "start", "voice": "anna"})
            if (await recv_json(ws))["type"] == "ready":
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("connection never freed")


async def test_model_not_loaded_is_tts_unavailable_until_attached():
    async with serve(no_engine=True) as client:
        assert (await client.get("/ready")).status == 503
        ws = await client.ws_connect("/api/v1/speak")
        err = await error_for(ws, {"type": "start", "voice": {"ref_audio": b64(wav_bytes()), "x_vector_only": True}})
        assert err["code"] == "TTS_UNAVAILABLE" and "loading" in err["message"]
        attach_engine(client.app, FakeEngine())
        assert (await client.get("/ready")).status == 200
        await ws.send_json({"type": "start", "voice": {"ref_audio": b64(wav_bytes()), "x_vector_only": True}})
        assert (await recv_json(ws))["type"] == "ready"
        await still_works(ws)


async def test_engine_rejecting_a_request_maps_to_a_code():
    class Picky(FakeEngine):
        languages = [*FakeEngine.languages, "elvish"]  # offered by name, refused by the engine

    async with serve(Picky(), voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna", "language": "elvish"})
        await recv_json(ws)
        await ws.send_json({"type": "speak", "id": "e", "text": "Words."})
        _, err, _ = await collect_utterance(ws)
        assert err["code"] == "INVALID_MESSAGE" and err["id"] == "e"


@pytest.mark.parametrize("headers,protocols,status", [
    ({}, (), 401),
    ({"Authorization": "Bearer wrong"}, (), 401),
    ({}, ("makima-tts.v1", "bearer.wrong"), 401),
    ({"Authorization": "Bearer s3cret"}, (), 101),
    ({}, ("makima-tts.v1", "bearer.s3cret"), 101),
])
async def test_token_auth_on_the_handshake(headers, protocols, status):
    async with serve(voices=VOICES, auth_tokens=frozenset({"s3cret", "other"})) as client:
        if status == 101:
            ws = await client.ws_connect("/api/v1/speak", headers=headers, protocols=protocols)
            await ws.send_json({"type": "start", "voice": "anna"})
            assert (await recv_json(ws))["type"] == "ready"
            return
        with pytest.raises(WSServerHandshakeError) as e:
            await client.ws_connect("/api/v1/speak", headers=headers, protocols=protocols)
        assert e.value.status == 401
        r = await client.get("/api/v1/speak", headers={"Connection": "Upgrade", "Upgrade": "websocket", **headers})
        assert r.status == 401 and (await r.json())["code"] == "UNAUTHORIZED"
        assert (await client.get("/health")).status == 200  # probes stay open


@pytest.mark.parametrize("origin,allowed,ok", [
    ("https://evil.example", frozenset(), False),
    ("https://app.example", frozenset({"https://app.example"}), True),
    ("https://evil.example", frozenset({"https://app.example"}), False),
    ("https://evil.example", frozenset({"*"}), True),
])
async def test_origin_allowlist(origin, allowed, ok):
    async with serve(voices=VOICES, allowed_origins=allowed) as client:
        if ok:
            ws = await client.ws_connect("/api/v1/speak", headers={"Origin": origin})
            await ws.close()
            return
        with pytest.raises(WSServerHandshakeError) as e:
            await client.ws_connect("/api/v1/speak", headers={"Origin": origin})
        assert e.value.status == 403
        same = f"http://{client.host}:{client.port}"
        ws = await client.ws_connect("/api/v1/speak", headers={"Origin": same})  # same origin always works
        await ws.close()


async def test_error_messages_are_json_with_the_documented_shape():
    async with serve(voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        err = await error_for(ws, "nope")
        assert set(err) == {"type", "code", "message"} and json.dumps(err)


async def test_no_spelling_of_a_guarded_url_skips_the_token():
    async with serve(voices=VOICES, auth_tokens=frozenset({"t"})) as client:
        for path in ("/api/v1/voices", "/api/v1/%76oices", "/api/v1/voices/", "/api/v1/./voices", "/v1/audio/speech",
                     "/api/v1/voices/anna", "/api/v1/nothing-here"):
            r = await client.get(path)
            assert r.status in (401, 404, 405), (path, r.status)
            if r.status != 401:
                assert "voices" not in await r.text()
        for raw in ("//api/v1/voices", "/api//v1/voices", "/static/../api/v1/voices"):  # not what yarl sends
            reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(f"GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            status = (await reader.read()).split(b"\r\n", 1)[0]
            writer.close()
            assert status.split()[1] in (b"401", b"404", b"403", b"400"), (raw, status)
        assert (await client.get("/static/speak.js")).status == 200
        assert (await client.get("/speak")).status == 200


async def test_an_engine_that_raises_fails_one_utterance():
    class Raising(FakeEngine):
        def submit(self, request):
            if "boom" in request.text:
                raise RuntimeError("kaboom")
            return super().submit(request)

    async with serve(Raising(), voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        await ws.send_json({"type": "speak", "id": "b", "text": "boom goes the engine"})
        err = await recv_json(ws)
        assert err["code"] == "SYNTHESIS_ERROR" and err["id"] == "b" and "kaboom" in err["message"]
        await still_works(ws)
