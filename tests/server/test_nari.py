"""The nari.speech.v1 adapter, checked the way tts_bench's runtime.py checks it (without installing it)."""

from __future__ import annotations

import json
import re

import aiohttp

from server.pcm import encode_pcm
from tests.server.conftest import serve
from tests.server.fake_engine import FakeEngine
from tests.server.test_speak import VOICES, expected

PROTOCOL = "nari.speech.v1"
AUDIO = {"encoding": "pcm_s16le", "sample_rate": 24000, "channels": 1}
TEXT = "Please call Stella. Ask her to bring these things with her from the store."


def word_chunks(text: str) -> list[str]:
    """tts_bench's TargetAdapter.input_chunks: each word with the whitespace before the next."""
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    bounds = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if a < b]


async def harness_run(client, text: str = TEXT, voice: str = "Ryan", language: str = "English"):
    """One request as runtime.py's execute_websocket makes it; returns (audio bytes, done, close code)."""
    async with client.ws_connect("/v1/audio/speech/ws", protocols=(PROTOCOL,)) as ws:
        assert ws.protocol == PROTOCOL
        created = json.loads((await ws.receive(timeout=5)).data)
        assert created["type"] == "session.created" and created["protocol"] == PROTOCOL and created["audio"] == AUDIO
        await ws.send_json({"type": "request.start", "model": "Qwen/Qwen3-TTS-12Hz-1.7B-CustomVoice", "voice": voice,
                            "language": language, "response_format": "pcm"})
        configured = json.loads((await ws.receive(timeout=5)).data)
        assert configured["type"] == "request.configured", configured
        audio, started, done, chunks = bytearray(), None, None, 0

        async def receive(until_ack: bool) -> dict | None:
            """Read events (audio counted) until an ack, or until response.done when not waiting for one;
            like runtime.py's receiver, response.done may come before the acks do."""
            nonlocal audio, started, done, chunks
            while True:
                msg = await ws.receive(timeout=10)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    assert started is not None, "audio arrived before response.started"
                    audio += msg.data
                    chunks += 1
                    continue
                assert msg.type == aiohttp.WSMsgType.TEXT, f"closed before the ack or done: {msg}"
                event = json.loads(msg.data)
                assert event["type"] != "error", event
                if event["type"] == "input_text.ack":
                    assert until_ack, event
                    return event
                if event["type"] == "response.started":
                    assert started is None and event["request_id"] and event["audio"] == AUDIO
                    started = event
                elif event["type"] == "response.done":
                    assert done is None
                    done = event
                    if not until_ack:
                        return None
                else:
                    raise AssertionError(f"unexpected event {event}")

        pieces = word_chunks(text)
        for sequence, piece in enumerate(pieces):
            await ws.send_json({"type": "input_text.append", "sequence": sequence, "text": piece})
            assert await receive(True) == {"type": "input_text.ack", "event": "input_text.append", "sequence": sequence}
        await ws.send_json({"type": "input_text.end", "sequence": len(pieces)})
        assert await receive(True) == {"type": "input_text.ack", "event": "input_text.end", "sequence": len(pieces)}
        if done is None:
            await receive(False)
        assert done["request_id"] == started["request_id"] and done["stop_reason"] == "stop"
        assert done["audio_chunks"] == chunks
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        return bytes(audio), done, ws.close_code


async def test_the_harness_sequence_passes_and_speaks_the_whole_text():
    engine = FakeEngine(chunk_delay=0.001)
    async with serve(engine, voices=VOICES, default_voice="anna") as client:
        audio, done, code = await harness_run(client)
        assert code == 1000 and done["makima_stop_reason"] == "eos"
        assert audio == encode_pcm(await expected(client, TEXT), "pcm_s16le")
        assert engine.submitted[0].live and not engine.blocks


async def test_our_frame_cap_still_reads_stop_and_a_registered_voice_is_used():
    engine = FakeEngine()
    async with serve(engine, voices=VOICES, default_voice="anna") as client:
        async with client.ws_connect("/v1/audio/speech/ws", protocols=(PROTOCOL,)) as ws:
            await ws.receive(timeout=5)
            await ws.send_json({"type": "request.start", "voice": "ben", "max_frames": 3})
            assert json.loads((await ws.receive(timeout=5)).data)["voice"] == "ben"
            await ws.send_json({"type": "input_text.append", "sequence": 0, "text": TEXT})
            await ws.send_json({"type": "input_text.end", "sequence": 1})
            events = []
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    events.append(json.loads(msg.data))
            done = events[-1]
            assert done["type"] == "response.done" and done["stop_reason"] == "stop"
            assert done["makima_stop_reason"] == "max_frames" and done["frames"] == 3
            assert ws.close_code == 1000


async def test_errors_cancel_and_a_missing_subprotocol():
    engine = FakeEngine(chunk_delay=0.001)
    async with serve(engine, voices=VOICES, default_voice="anna") as client:
        async with client.ws_connect("/v1/audio/speech/ws") as ws:  # no nari.speech.v1
            event = json.loads((await ws.receive(timeout=5)).data)
            assert event["type"] == "error" and event["error"]["code"] == "UNSUPPORTED"
        async with client.ws_connect("/v1/audio/speech/ws", protocols=(PROTOCOL,)) as ws:
            await ws.receive(timeout=5)
            await ws.send_json({"type": "input_text.append", "sequence": 0, "text": "early"})
            assert json.loads((await ws.receive(timeout=5)).data)["error"]["code"] == "INVALID_MESSAGE"
            await ws.send_json({"type": "request.start", "response_format": "mp3"})
            assert json.loads((await ws.receive(timeout=5)).data)["error"]["code"] == "UNSUPPORTED"
            await ws.send_json({"type": "request.start", "temperature": 0.5})
            assert json.loads((await ws.receive(timeout=5)).data)["error"]["code"] == "INVALID_MESSAGE"
            await ws.send_json({"type": "request.start"})
            assert json.loads((await ws.receive(timeout=5)).data)["type"] == "request.configured"
            await ws.send_json({"type": "input_text.append", "sequence": "0", "text": "x"})
            assert json.loads((await ws.receive(timeout=5)).data)["error"]["code"] == "INVALID_MESSAGE"
            await ws.send_json({"type": "input_text.append", "sequence": 0, "text": "Some words"})
            assert json.loads((await ws.receive(timeout=5)).data)["type"] == "input_text.ack"
            assert engine.blocks  # the request is running, waiting for the rest of its text
            await ws.send_json({"type": "response.cancel"})
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == 1000
        assert not engine.blocks and not engine.live


class EndsEarly(FakeEngine):
    """A model that stops (EOS) after one chunk, before the live text is over (seen with random weights)."""

    async def submit(self, request):
        request.live = False  # speak what has come, at once
        request.text = request.text or "x"
        request.max_frames = 1
        async for item in super().submit(request):
            yield item


async def test_audio_that_ends_before_the_text_still_acks_every_append_and_the_end():
    async with serve(EndsEarly(chunk_delay=0.0), voices=VOICES, default_voice="anna") as client:
        _, done, code = await harness_run(client)  # fails if the socket closes before the last ack
        assert code == 1000 and done["makima_stop_reason"] == "max_frames" and done["audio_chunks"] == 1


async def test_idle_timeout_fires_for_a_stock_client_that_answers_the_servers_pings():
    """As on /api/v1/speak: only client events count as activity, never the pongs that the server's own
    heartbeat draws from every compliant client (aiohttp's receive(timeout=) restarts on each)."""
    async with serve(voices=VOICES, heartbeat_s=0.1, idle_timeout_s=0.6) as client:
        async with client.ws_connect("/v1/audio/speech/ws", protocols=(PROTOCOL,), autoping=True) as ws:
            assert json.loads((await ws.receive(timeout=5)).data)["type"] == "session.created"
            err = json.loads((await ws.receive(timeout=5)).data)
            assert err["type"] == "error" and err["error"]["code"] == "IDLE_TIMEOUT", err
            assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
