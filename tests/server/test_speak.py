"""The /api/v1/speak WebSocket: every client message, ordering, cancel/stop, and the audio bytes."""

from __future__ import annotations

import asyncio
import json

import numpy as np
from aiohttp import WSMsgType

from engine.api import Request
from server.pcm import encode_pcm
from tests.server.conftest import collect_utterance, recv_json, serve, wav_bytes
from tests.server.fake_engine import FakeEngine, fake_audio

VOICES = {"anna": wav_bytes(1.0, freq=200.0), "ben": wav_bytes(1.2, freq=330.0)}


async def start(client, **fields) -> tuple[object, dict]:
    ws = await client.ws_connect("/api/v1/speak")
    await ws.send_json({"type": "start", "voice": "anna", **fields})
    return ws, await recv_json(ws)


async def expected(client, text: str, voice: str = "anna", **req) -> np.ndarray:
    from server.state import STATE

    prompt = await client.app[STATE].voices.prompt(voice)
    return fake_audio(Request(text=text, voice=prompt, **req))


async def test_start_ready_and_one_utterance_f32_equals_engine_output():
    async with serve(voices=VOICES) as client:
        ws, ready = await start(client, encoding="pcm_f32le", language="English")
        assert ready["type"] == "ready" and ready["sample_rate"] == 24000 and ready["encoding"] == "pcm_f32le"
        assert ready["voice"] == "anna" and ready["language"] == "english" and ready["session_id"]
        await ws.send_json({"type": "speak", "id": "u1", "text": "Hello there, how are you today?"})
        audio, done, _ = await collect_utterance(ws)
        want = await expected(client, "Hello there, how are you today?")
        got = np.frombuffer(audio, dtype="<f4")
        np.testing.assert_array_equal(got, want)
        assert done["type"] == "complete" and done["id"] == "u1" and done["frames"] == len(want) // 1920
        assert done["audio_ms"] == len(want) / 24.0 and done["ttfa_ms"] is not None and done["stop_reason"] == "eos"
        await ws.close()


async def test_pcm_s16le_default_encoding_and_integer_ids():
    async with serve(voices=VOICES) as client:
        ws, ready = await start(client)
        assert ready["encoding"] == "pcm_s16le"
        await ws.send_json({"type": "speak", "id": 7, "text": "Sixteen bit audio."})
        audio, done, _ = await collect_utterance(ws)
        assert audio == encode_pcm(await expected(client, "Sixteen bit audio."), "pcm_s16le")
        assert done["id"] == 7


async def test_utterances_play_in_order_and_voice_and_sampling_reach_the_engine():
    engine = FakeEngine(chunk_delay=0.002)
    async with serve(engine, voices=VOICES) as client:
        ws, _ = await start(client, voice="ben", encoding="pcm_f32le", priority="high", max_frames=5,
                            sampling={"seed": 3, "temperature": 0.7, "top_k": 20}, non_streaming_text=True)
        texts = ["First sentence here.", "Second one, a bit longer than the first.", "Third."]
        for i, t in enumerate(texts):
            await ws.send_json({"type": "speak", "id": f"u{i}", "text": t})
        for i, t in enumerate(texts):
            audio, done, _ = await collect_utterance(ws)
            assert done["id"] == f"u{i}"
            want = await expected(client, t, voice="ben", max_frames=5, sampling=engine.submitted[i].sampling)
            np.testing.assert_array_equal(np.frombuffer(audio, "<f4"), want)
        req = engine.submitted[0]
        assert req.priority.name == "HIGH" and req.max_frames == 5 and req.non_streaming_text
        assert req.sampling.seed == 3 and req.sampling.temperature == 0.7 and req.sampling.subtalker_top_k == 20
        assert req.sampling.do_sample


async def test_greedy_and_default_sampling():
    engine = FakeEngine()
    async with serve(engine, voices=VOICES) as client:
        ws, _ = await start(client, sampling={"greedy": True})
        await ws.send_json({"type": "speak", "text": "Greedy please."})
        _, done, _ = await collect_utterance(ws)
        assert done["id"] == "utt-1"  # the server names utterances sent without an id
        assert not engine.submitted[0].sampling.do_sample and not engine.submitted[0].sampling.subtalker_do_sample
        ws2, _ = await start(client)
        await ws2.send_json({"type": "speak", "text": "Defaults."})
        await collect_utterance(ws2)
        assert engine.submitted[1].sampling is None  # the engine applies the checkpoint's defaults


async def test_append_speaks_sentences_as_they_complete_and_flush_speaks_the_rest():
    async with serve(voices=VOICES) as client:
        ws, _ = await start(client, encoding="pcm_f32le")
        for piece in ["The first sen", "tence is here. And the sec", "ond one ends now! Trailing words"]:
            await ws.send_json({"type": "append", "text": piece})
        seg1 = await recv_json(ws)
        assert seg1 == {"type": "segment", "id": seg1["id"], "text": "The first sentence is here."}
        audio, done, others = await collect_utterance(ws)
        assert done["id"] == seg1["id"]
        np.testing.assert_array_equal(np.frombuffer(audio, "<f4"), await expected(client, seg1["text"]))
        seg2 = others[0] if others else await recv_json(ws)
        assert seg2["text"] == "And the second one ends now!"
        _, done2, _ = await collect_utterance(ws)
        assert done2["id"] == seg2["id"]
        await ws.send_json({"type": "flush"})
        seg3 = await recv_json(ws)
        assert seg3["text"] == "Trailing words"
        _, done3, _ = await collect_utterance(ws)
        assert done3["id"] == seg3["id"]


async def test_cancel_stops_current_drops_queued_and_session_goes_on():
    engine = FakeEngine(chunk_delay=0.02)
    async with serve(engine, voices=VOICES) as client:
        ws, _ = await start(client)
        await ws.send_json({"type": "speak", "id": "long", "text": "x" * 600})
        await ws.send_json({"type": "speak", "id": "q1", "text": "Queued one."})
        await ws.send_json({"type": "speak", "id": "q2", "text": "Queued two."})
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.BINARY
        await ws.send_json({"type": "cancel"})
        while True:  # audio already in flight may still arrive, but nothing after "cancelled"
            msg = await ws.receive(timeout=5)
            if msg.type == WSMsgType.TEXT:
                break
        assert json.loads(msg.data) == {"type": "cancelled", "id": "long", "dropped": ["q1", "q2"]}
        await asyncio.sleep(0.1)
        assert engine.stats().kv_blocks_used == 0 and engine.stats().running == 0
        await ws.send_json({"type": "speak", "id": "after", "text": "Still here."})
        _, done, others = await collect_utterance(ws)
        assert done["id"] == "after" and others == []
        await ws.send_json({"type": "cancel"})  # nothing playing: still answered
        assert await recv_json(ws) == {"type": "cancelled", "id": None, "dropped": []}


async def test_stop_answers_stopped_and_closes_1000():
    engine = FakeEngine(chunk_delay=0.02)
    async with serve(engine, voices=VOICES) as client:
        ws, _ = await start(client)
        await ws.send_json({"type": "speak", "id": "a", "text": "y" * 300})
        await ws.receive(timeout=5)
        await ws.send_json({"type": "stop"})
        assert await recv_json(ws) == {"type": "stopped"}
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1000
        await asyncio.sleep(0.05)
        assert engine.stats().kv_blocks_used == 0


async def test_websocket_settings_no_compression_and_subprotocol():
    async with serve(voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak", compress=15, protocols=("makima-tts.v1",))
        assert ws.compress == 0 and ws.protocol == "makima-tts.v1"
        await ws.close()


async def test_oversized_frame_closes_1009():
    async with serve(voices=VOICES, ws_max_message_bytes=4096) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_str(json.dumps({"type": "speak", "text": "z" * 5000}))
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1009


async def test_idle_session_is_told_and_closed():
    async with serve(voices=VOICES, idle_timeout_s=0.3) as client:
        ws, _ = await start(client)
        err = await recv_json(ws)
        assert err["code"] == "IDLE_TIMEOUT"
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1000


async def test_a_long_utterance_is_not_an_idle_session():
    engine = FakeEngine(chunk_delay=0.05)
    async with serve(engine, voices=VOICES, idle_timeout_s=0.2) as client:
        ws, _ = await start(client)
        await ws.send_json({"type": "speak", "id": "a", "text": "w" * 40})  # ~13 frames, ~0.4 s
        _, done, _ = await collect_utterance(ws)
        assert done["type"] == "complete"


async def test_server_ttfa_ends_when_audio_is_handed_to_the_socket_not_when_the_client_has_read_it(monkeypatch):
    """The page's figure (sending the text → hearing it) must contain the server's: a send that waits on
    the client is the client's time, so it must not be in the server's TTFA."""
    from aiohttp import web

    slow_s = 0.3
    real = web.WebSocketResponse.send_bytes

    async def slow_client(self, data, *args, **kwargs):  # as if the socket waited on the client to drain
        await asyncio.sleep(slow_s)
        return await real(self, data, *args, **kwargs)

    monkeypatch.setattr(web.WebSocketResponse, "send_bytes", slow_client)
    async with serve(voices=VOICES) as client:
        ws, _ = await start(client)
        await ws.send_json({"type": "speak", "id": "u1", "text": "Hello there."})
        _, done, _ = await collect_utterance(ws)
        assert done["ttfa_ms"] < slow_s * 1000 <= done["wall_ms"], done
