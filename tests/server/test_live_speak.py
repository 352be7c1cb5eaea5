"""Live utterances on /api/v1/speak: speak with "live": true, append, end; acks; cancel; errors."""

from __future__ import annotations

import asyncio

import numpy as np

from tests.server.conftest import collect_utterance, recv_json, serve
from tests.server.fake_engine import FakeEngine
from tests.server.test_speak import VOICES, expected, start

TEXT = "Hello there, how are you today? Fine."


async def test_a_live_utterance_is_one_request_with_the_whole_texts_audio():
    engine = FakeEngine(chunk_delay=0.001)
    async with serve(engine, voices=VOICES) as client:
        ws, _ = await start(client, encoding="pcm_f32le")
        await ws.send_json({"type": "speak", "id": "L", "live": True, "text": "Hel"})
        pieces = ["lo there, ", "how are", " you today?", " Fine."]
        for seq, piece in enumerate(pieces):
            await ws.send_json({"type": "append", "text": piece, "seq": seq})
            assert await recv_json(ws) == {"type": "ack", "event": "append", "seq": seq, "id": "L"}
            await asyncio.sleep(0.02)
        await ws.send_json({"type": "end", "seq": 9})
        assert await recv_json(ws) == {"type": "ack", "event": "end", "seq": 9, "id": "L"}
        audio, done, others = await collect_utterance(ws)
        assert done["type"] == "complete" and done["id"] == "L" and not others  # no segments: one utterance
        np.testing.assert_array_equal(np.frombuffer(audio, "<f4"), await expected(client, TEXT))
        assert len(engine.submitted) == 1 and engine.submitted[0].live
        # Appends without a seq get no ack; after end, append is sentence mode again.
        await ws.send_json({"type": "speak", "id": "M", "live": True})
        await ws.send_json({"type": "append", "text": "Quiet appends."})
        await ws.send_json({"type": "end"})
        _, done, others = await collect_utterance(ws)
        assert done["id"] == "M" and not others
        await ws.send_json({"type": "append", "text": "A sentence of the old kind. "})
        assert (await recv_json(ws))["type"] == "segment"


async def test_a_live_utterance_queued_behind_another_keeps_its_text_and_order():
    engine = FakeEngine(chunk_delay=0.005)
    async with serve(engine, voices=VOICES) as client:
        ws, _ = await start(client, encoding="pcm_f32le")
        await ws.send_json({"type": "speak", "id": "first", "text": "A whole utterance before it."})
        await ws.send_json({"type": "speak", "id": "L", "live": True})
        await ws.send_json({"type": "append", "text": "Text that came "})
        await ws.send_json({"type": "append", "text": "while waiting."})
        await ws.send_json({"type": "end"})
        _, done, _ = await collect_utterance(ws)
        assert done["id"] == "first"
        audio, done, _ = await collect_utterance(ws)
        assert done["id"] == "L"
        np.testing.assert_array_equal(np.frombuffer(audio, "<f4"),
                                      await expected(client, "Text that came while waiting."))
        assert not engine.submitted[1].live  # ended before its turn: an ordinary whole-text request


async def test_cancel_stops_an_open_live_utterance_and_frees_it():
    engine = FakeEngine(chunk_delay=0.001)
    async with serve(engine, voices=VOICES) as client:
        ws, _ = await start(client)
        await ws.send_json({"type": "speak", "id": "L", "live": True, "text": "Never ends"})
        for _ in range(100):  # its turn has come: the engine holds it, waiting for text
            if engine.live:
                break
            await asyncio.sleep(0.01)
        assert engine.blocks
        await ws.send_json({"type": "cancel"})
        msg = await recv_json(ws)
        assert msg == {"type": "cancelled", "id": "L", "dropped": []}
        assert not engine.blocks and not engine.live
        await ws.send_json({"type": "end"})  # nothing is open any more
        assert (await recv_json(ws))["code"] == "INVALID_MESSAGE"


async def test_live_errors_are_coded():
    async with serve(voices=VOICES, max_text_chars=40) as client:
        ws, _ = await start(client)
        await ws.send_json({"type": "end"})
        assert (await recv_json(ws))["code"] == "INVALID_MESSAGE"
        await ws.send_json({"type": "speak", "id": "L", "live": True})
        await ws.send_json({"type": "speak", "id": "L2", "live": True})
        assert (await recv_json(ws)) | {"message": ""} == {"type": "error", "code": "INVALID_MESSAGE", "id": "L2",
                                                           "message": ""}
        await ws.send_json({"type": "append", "text": "x" * 41})
        assert (await recv_json(ws))["code"] == "TEXT_TOO_LONG"
        await ws.send_json({"type": "append", "text": "ok", "seq": "1"})
        assert (await recv_json(ws))["code"] == "INVALID_MESSAGE"
        await ws.send_json({"type": "speak", "live": "yes"})
        assert (await recv_json(ws))["code"] == "INVALID_MESSAGE"
        await ws.send_json({"type": "end"})
        _, done, _ = await collect_utterance(ws)  # its text is empty: the engine's coded error
        assert done["type"] == "error" and done["id"] == "L" and done["code"] == "INVALID_MESSAGE"
        ws2, _ = await start(client, non_streaming_text=True)
        await ws2.send_json({"type": "speak", "live": True})
        assert "non_streaming_text" in (await recv_json(ws2))["message"]
