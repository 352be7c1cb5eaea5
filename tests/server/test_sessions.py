"""Many sessions at once, disconnects, slow readers, drain and metrics."""

from __future__ import annotations

import asyncio
import re
import threading

import numpy as np
from aiohttp import WSMsgType

from engine.api import Request
from server.app import drain
from server.state import STATE
from tests.server.conftest import collect_utterance, recv_json, serve, wav_bytes
from tests.server.fake_engine import FakeEngine, fake_audio

VOICES = {"anna": wav_bytes(1.0, freq=200.0), "ben": wav_bytes(1.0, freq=300.0)}


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


async def test_32_concurrent_sessions_each_get_complete_correct_audio():
    engine = FakeEngine(chunk_delay=0.002)
    async with serve(engine, voices=VOICES) as client:
        prompts = {v: await client.app[STATE].voices.prompt(v) for v in VOICES}

        async def one(i: int) -> None:
            voice = "anna" if i % 2 else "ben"
            text = f"Session number {i} says something {'long ' * (i % 5)}and different."
            ws = await client.ws_connect("/api/v1/speak")
            await ws.send_json({"type": "start", "voice": voice, "encoding": "pcm_f32le", "sampling": {"seed": i}})
            assert (await recv_json(ws))["type"] == "ready"
            await ws.send_json({"type": "speak", "id": i, "text": text})
            audio, done, _ = await collect_utterance(ws, timeout=20)
            assert done["type"] == "complete" and done["id"] == i
            want = fake_audio(Request(text=text, voice=prompts[voice], sampling=engine.submitted_by_text[text]))
            np.testing.assert_array_equal(np.frombuffer(audio, "<f4"), want)
            await ws.close()

        engine.submitted_by_text = {}
        orig = engine.submit

        def submit(req):
            engine.submitted_by_text[req.text] = req.sampling
            return orig(req)

        engine.submit = submit
        await asyncio.gather(*(one(i) for i in range(32)))
        assert len(engine.submitted) == 32 and engine.stats().kv_blocks_used == 0


async def test_disconnect_mid_stream_frees_kv_blocks_in_metrics():
    engine = FakeEngine(chunk_delay=0.02)
    async with serve(engine, voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        await ws.send_json({"type": "speak", "id": "long", "text": "v" * 900})
        for _ in range(3):
            assert (await ws.receive(timeout=5)).type == WSMsgType.BINARY
        text = await (await client.get("/metrics")).text()
        assert metric(text, "makima_tts:kv_blocks_used") > 0 and metric(text, "makima_tts:num_requests_running") == 1
        ws._response.connection.transport.abort()  # vanish without a close frame
        for _ in range(100):
            text = await (await client.get("/metrics")).text()
            if metric(text, "makima_tts:kv_blocks_used") == 0:
                break
            await asyncio.sleep(0.01)
        assert metric(text, "makima_tts:kv_blocks_used") == 0
        assert metric(text, "makima_tts:num_requests_running") == 0
        assert metric(text, "makima_tts:kv_blocks_capacity") == 512
        rid = engine.submitted[0].request_id
        assert rid not in engine.blocks
        for _ in range(100):
            text = await (await client.get("/metrics")).text()
            if metric(text, "makima_tts:num_sessions") == 0:
                break
            await asyncio.sleep(0.01)
        assert metric(text, "makima_tts:num_sessions") == 0
        assert metric(text, 'makima_tts:requests_total{outcome="client_gone"}') == 1


async def test_a_client_that_stops_reading_loses_its_session_and_never_blocks_others():
    engine = FakeEngine(chunk_delay=0.0, chunk_frames=(16,))
    async with serve(engine, voices=VOICES, write_timeout_s=0.5, max_text_chars=20000) as client:
        slow = await client.ws_connect("/api/v1/speak", max_msg_size=0)
        await slow.send_json({"type": "start", "voice": "anna", "encoding": "pcm_f32le"})
        await recv_json(slow)
        # ~50 MB of float audio: far more than socket buffers hold; this client then never reads.
        await slow.send_json({"type": "speak", "id": "flood", "text": "f" * 20000})
        fast = await client.ws_connect("/api/v1/speak")
        await fast.send_json({"type": "start", "voice": "ben"})
        await recv_json(fast)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(3):
            await fast.send_json({"type": "speak", "id": i, "text": "A quick reply."})
            _, done, _ = await collect_utterance(fast)
            assert done["type"] == "complete"
        assert loop.time() - t0 < 2.0
        for _ in range(300):  # the write timeout drops the slow session and frees its blocks
            if engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().running == 0 and engine.stats().kv_blocks_used == 0
        text = await (await client.get("/metrics")).text()
        assert metric(text, 'makima_tts:requests_total{outcome="client_gone"}') == 1  # dropped, not finished


async def test_drain_turns_ready_off_refuses_new_sockets_and_lets_streams_finish():
    engine = FakeEngine(chunk_delay=0.01)
    async with serve(engine, voices=VOICES, drain_timeout_s=5) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        await ws.send_json({"type": "speak", "id": "a", "text": "Finish me please, I am in flight."})
        draining = asyncio.ensure_future(drain(client.app))
        await asyncio.sleep(0.02)
        r = await client.get("/ready")
        assert r.status == 503 and (await r.json())["reason"] == "draining"
        r = await client.get("/api/v1/speak", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                       "Sec-WebSocket-Version": "13",
                                                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert r.status == 503 and (await r.json())["code"] == "TTS_UNAVAILABLE" and r.headers["Retry-After"]
        _, done, _ = await collect_utterance(ws)
        assert done["type"] == "complete"
        await ws.close()
        assert await asyncio.wait_for(draining, 5)


async def test_metrics_names_and_counts():
    async with serve(voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        await ws.send_json({"type": "speak", "id": 1, "text": "Count me in the metrics."})
        await collect_utterance(ws)
        await ws.send_json({"type": "speak", "id": 2, "text": ""})
        await recv_json(ws)
        r = await client.get("/metrics")
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
        assert metric(text, "makima_tts:time_to_first_audio_seconds_count") == 1
        assert metric(text, "makima_tts:real_time_factor_count") == 1
        assert metric(text, "makima_tts:e2e_request_latency_seconds_count") == 1
        assert metric(text, "makima_tts:frames_generated_total") == 8
        assert metric(text, 'makima_tts:requests_total{outcome="ok"}') == 1
        assert metric(text, 'makima_tts:errors_total{code="INVALID_MESSAGE"}') == 1
        assert metric(text, "makima_tts:audio_seconds_total") == 8 * 0.08
        assert metric(text, "makima_tts:num_sessions") == 1 and metric(text, "makima_tts:ready") == 1
        for name in ("num_requests_waiting", "kv_blocks_capacity", "kv_cache_usage_perc", "kv_blocks_cached"):
            metric(text, "makima_tts:" + name)


async def test_health_ready_info():
    async with serve(voices=VOICES, default_voice="anna") as client:
        assert (await (await client.get("/health")).json()) == {"status": "ok"}
        assert (await (await client.get("/ready")).json()) == {"ready": True}
        info = await (await client.get("/api/v1/info")).json()
        assert info["ready"] and info["sample_rate"] == 24000 and "english" in info["languages"]
        assert info["default_voice"] == "anna" and not info["auth_required"] and not info["noise"]
    async with serve(no_engine=True) as client:
        client.app[STATE].load_error = "checkpoint not found"
        r = await client.get("/ready")
        assert r.status == 503 and "checkpoint not found" in (await r.json())["reason"]
        assert (await client.get("/health")).status == 200


async def test_drain_does_not_wait_for_idle_sockets_and_shutdown_closes_them_1001():
    async with serve(voices=VOICES, drain_timeout_s=10) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        await recv_json(ws)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await drain(client.app)
        assert loop.time() - t0 < 1.0
        await client.app.shutdown()
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE and msg.data == 1001


async def test_background_load_reports_progress_then_ready_or_the_failure():
    from aiohttp.test_utils import TestClient, TestServer

    from server.app import create_app, load_in_background
    from server.settings import ServerSettings

    gate = threading.Event()

    def load(progress):
        progress("reading weights")
        gate.wait(5)
        return FakeEngine()

    def broken(progress):
        raise FileNotFoundError("no checkpoint at /nowhere")

    for loader, outcome in ((load, "ready"), (broken, "failed")):
        app = create_app(None, ServerSettings())
        load_in_background(app, loader)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            if outcome == "ready":
                for _ in range(100):
                    r = await client.get("/ready")
                    if "reading weights" in (await r.json())["reason"]:
                        break
                    await asyncio.sleep(0.01)
                assert r.status == 503 and (await r.json())["reason"] == "loading: reading weights"
                gate.set()
            for _ in range(200):
                r = await client.get("/ready")
                if r.status == 200 or "failed" in (await r.json())["reason"]:
                    break
                await asyncio.sleep(0.01)
            if outcome == "ready":
                assert r.status == 200
            else:
                assert r.status == 503 and "no checkpoint at /nowhere" in (await r.json())["reason"]
                info = await (await client.get("/api/v1/info")).json()  # not "loading" forever
                assert info["progress"] == "failed" and "no checkpoint at /nowhere" in info["error"]
                ws = await client.ws_connect("/api/v1/speak")
                await ws.send_json({"type": "start", "voice": "anna"})
                err = await recv_json(ws)
                assert err["code"] == "TTS_UNAVAILABLE" and "no checkpoint" in err["message"]
                await ws.close()
