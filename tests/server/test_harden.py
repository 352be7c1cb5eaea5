"""Issue #13 through the real server (fake engine): each bad input a hostile client sent gets a coded
answer, never a 500, a silent close or a held slot."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading

import aiohttp
import numpy as np
import pytest
import soundfile as sf
from aiohttp import WSMsgType, web

from server import protocol as P
from server.app import create_app
from server.settings import ServerSettings
from server.state import STATE, in_flight
from tests.server.conftest import recv_json, serve, wav_bytes
from tests.server.fake_engine import FakeEngine

VOICES = {"anna": wav_bytes(1.0)}
HUGE = "1" + "0" * 400  # a JSON integer no float can hold


# ---- item 2: one numeric parser that cannot raise -----------------------------------------------
@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
async def test_a_huge_integer_in_a_float_field_is_a_coded_error_and_the_session_lives(field):
    async with serve(voices=VOICES) as client:
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_str(f'{{"type": "start", "voice": "anna", "sampling": {{"{field}": {HUGE}}}}}')
        err = await recv_json(ws)
        assert (err["type"], err["code"]) == ("error", "INVALID_MESSAGE"), err
        await ws.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws))["type"] == "ready"
        await ws.close()



# ---- item 3: the idle timeout counts application messages only; a socket must start in time ---
async def test_idle_timeout_fires_for_a_stock_client_that_answers_the_servers_pings():
    # heartbeat 0.1 s: the server pings ten times a second and aiohttp's client pongs each one.
    async with serve(voices=VOICES, heartbeat_s=0.1, idle_timeout_s=0.6) as client:
        ws = await client.ws_connect("/api/v1/speak", autoping=True)
        await ws.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws))["type"] == "ready"
        err = await recv_json(ws, timeout=5)
        assert err["code"] == "IDLE_TIMEOUT", err
        assert (await ws.receive(timeout=5)).type == WSMsgType.CLOSE


async def test_a_socket_that_never_starts_gives_its_connection_back():
    async with serve(voices=VOICES, heartbeat_s=0.1, max_connections=1, start_timeout_s=0.5) as client:
        silent = await client.ws_connect("/api/v1/speak", autoping=True)
        err = await recv_json(silent, timeout=5)
        assert err["code"] == "IDLE_TIMEOUT" and "start" in err["message"], err
        await silent.close()
        for _ in range(50):
            ws = await client.ws_connect("/api/v1/speak")
            await ws.send_json({"type": "start", "voice": "anna"})
            if (await recv_json(ws))["type"] == "ready":
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the silent socket's connection never came back")
        await ws.close()


async def test_64_silent_sockets_do_not_stop_a_65th_client_from_speaking():
    """Slots are counted from start: sockets that connect and never start (as many as there are slots,
    heartbeats answered) leave every slot to clients that speak, on the WebSocket and over HTTP."""
    async with serve(voices=VOICES, heartbeat_s=0.1) as client:
        slots = client.app[STATE].settings.max_sessions
        assert slots == 64  # the default the issue measured
        silent = [await client.ws_connect("/api/v1/speak", autoping=True) for _ in range(slots)]
        # Each reads, so aiohttp pongs the server's pings, as a compliant client's library does (one that
        # does not read misses its pongs and the heartbeat closes it, freeing what it held anyway).
        readers = [asyncio.create_task(s.receive()) for s in silent]
        await asyncio.sleep(0.3)  # a few heartbeats
        assert client.app[STATE].active == 0 and len(client.app[STATE].sessions) == slots
        assert in_flight(client.app[STATE]) == 0  # unstarted sockets are no load (the drain waits on this)
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws))["type"] == "ready"
        await ws.send_json({"type": "speak", "id": 1, "text": "Hi."})
        assert (await recv_json(ws))["type"] == "complete"
        speech = await client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "anna", "response_format": "pcm"})
        assert speech.status == 200 and len(await speech.read()) > 0
        assert client.app[STATE].active == 1 and not any(r.done() for r in readers)  # all still open, silent
        await ws.close()
        for r in readers:
            r.cancel()
        for s in silent:
            await s.close()


# ---- item 4: header parsing cannot raise --------------------------------------------------------
async def raw_request(client, head: bytes) -> tuple[int, dict | None]:
    """Send raw request bytes (headers no client library would send) and read the status and JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    try:
        writer.write(head)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1])
    body = raw.partition(b"\r\n\r\n")[2]
    return status, json.loads(body) if body.startswith(b"{") else None


WS_UPGRADE = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
BAD_HEADERS = [
    (b"POST /v1/audio/speech", b"Origin: http://[\r\nContent-Length: 0\r\n", 403, "FORBIDDEN"),
    (b"GET /api/v1/speak", WS_UPGRADE + b"Origin: http://[::1\r\n", 403, "FORBIDDEN"),
    (b"POST /v1/audio/speech", b"Authorization: Bearer \xff\xfe\r\nContent-Length: 0\r\n", 401, "UNAUTHORIZED"),
    (b"GET /api/v1/speak", WS_UPGRADE + b"Sec-WebSocket-Protocol: makima-tts.v1, bearer.\xe9\xff\r\n", 401,
     "UNAUTHORIZED"),
]


@pytest.mark.parametrize(("line", "headers", "status", "code"), BAD_HEADERS)
async def test_a_header_no_parser_expects_is_refused_with_a_code_and_no_traceback(line, headers, status, code, caplog):
    async with serve(voices=VOICES, auth_tokens=frozenset({"right-token"})) as client:
        got = await raw_request(client, line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + headers
                                + b"\r\n")
    assert got[0] == status and got[1] is not None and got[1]["code"] == code, got
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


# ---- item 6: an unknown charset on a JSON body --------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/audio/speech", "/api/v1/voices"])
async def test_an_unknown_charset_on_a_json_body_is_a_coded_400(path, caplog):
    async with serve(voices=VOICES) as client:
        resp = await client.post(path, data=b'{"input": "Hi.", "voice": "anna"}',
                                 headers={"Content-Type": "application/json; charset=bogus"})
        assert resp.status == 400 and (await resp.json())["code"] == "UNSUPPORTED"
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


# ---- item 5: replicas sharing one voices directory ----------------------------------------------
def voice_form(voice_id: str) -> aiohttp.FormData:
    f = aiohttp.FormData()
    f.add_field("audio", wav_bytes(1.0), filename="clip.wav", content_type="application/octet-stream")
    f.add_field("voice_id", voice_id)
    f.add_field("x_vector_only", "true")
    return f


async def test_two_replicas_on_one_voices_directory_agree_and_never_500(tmp_path):
    engine = FakeEngine()
    async with serve(engine, voices_dir=tmp_path) as a, serve(engine, voices_dir=tmp_path) as b:
        assert (await a.post("/api/v1/voices", data=voice_form("anna"))).status == 201
        # B started before A created it: it reads through to the disk.
        again = await b.post("/api/v1/voices", data=voice_form("anna"))
        assert again.status == 409 and (await again.json())["code"] == "VOICE_EXISTS"
        assert [v["voice_id"] for v in (await (await b.get("/api/v1/voices")).json())["voices"]] == ["anna"]
        ws = await b.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        assert (await recv_json(ws))["type"] == "ready"  # B's prompt cache now holds anna
        await ws.close()
        assert (await a.delete("/api/v1/voices/anna")).status == 200
        ws = await b.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": "anna"})
        err = await recv_json(ws)
        assert (err["type"], err["code"]) == ("error", "VOICE_NOT_FOUND"), err
        await ws.close()
        speech = await b.post("/v1/audio/speech", json={"input": "Hi.", "voice": "anna", "response_format": "pcm"})
        assert speech.status == 404 and (await speech.json())["code"] == "VOICE_NOT_FOUND"
        gone = await b.delete("/api/v1/voices/anna")
        assert gone.status == 404 and (await gone.json())["code"] == "VOICE_NOT_FOUND"
        assert (await (await b.get("/api/v1/voices")).json())["voices"] == []
        # and B may now create the id A gave up
        assert (await b.post("/api/v1/voices", data=voice_form("anna"))).status == 201
        assert (await a.get("/api/v1/voices/anna")).status == 200


# ---- item 7 (and 11): voice quotas, stored clip size, a multipart body cap -----------------------
async def test_voice_count_quota_is_a_coded_507_until_a_voice_is_deleted(tmp_path):
    async with serve(voices_dir=tmp_path, max_voices=2) as client:
        for vid in ("v1", "v2"):
            assert (await client.post("/api/v1/voices", data=voice_form(vid))).status == 201
        full = await client.post("/api/v1/voices", data=voice_form("v3"))
        assert full.status == 507 and (await full.json())["code"] == "QUOTA_EXCEEDED"
        assert (await client.delete("/api/v1/voices/v1")).status == 200
        assert (await client.post("/api/v1/voices", data=voice_form("v3"))).status == 201


async def test_voice_bytes_quota_counts_what_is_on_disk(tmp_path):
    # A 1 s clip is stored as 48 KB of 16-bit 24 kHz mono: two fit in 120 KB, a third does not.
    async with serve(voices_dir=tmp_path, max_voices_bytes=120_000) as client:
        for vid in ("v1", "v2"):
            assert (await client.post("/api/v1/voices", data=voice_form(vid))).status == 201
        full = await client.post("/api/v1/voices", data=voice_form("v3"))
        assert full.status == 507 and (await full.json())["code"] == "QUOTA_EXCEEDED"
    assert sorted(d.name for d in tmp_path.iterdir()) == ["v1", "v2"]  # nothing half-written left behind


async def test_a_stored_clip_is_24k_mono_16_bit_whatever_was_uploaded(tmp_path):
    t = np.arange(2 * 48000) / 48000
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 200 * t), 0.2 * np.sin(2 * np.pi * 300 * t)], axis=1)
    buf = io.BytesIO()
    sf.write(buf, stereo.astype(np.float32), 48000, format="WAV", subtype="FLOAT")
    upload = buf.getvalue()  # 768 KB
    async with serve(voices_dir=tmp_path) as client:
        f = aiohttp.FormData()
        f.add_field("audio", upload, filename="big.wav", content_type="audio/wav")
        f.add_field("voice_id", "big")
        f.add_field("x_vector_only", "true")
        assert (await client.post("/api/v1/voices", data=f)).status == 201
    stored = list((tmp_path / "big").glob("reference.*"))
    assert len(stored) == 1 and stored[0].stat().st_size <= 2 * 24000 * 2 + 1024, (stored, len(upload))
    info = sf.info(str(stored[0]))
    assert (info.samplerate, info.channels, info.frames) == (24000, 1, 48000)


@pytest.mark.parametrize(("fields", "size"), [(500, 1), (8, 16000)])
async def test_a_multipart_body_is_capped_as_a_whole(fields, size, tmp_path):
    async with serve(voices_dir=tmp_path) as client:
        f = aiohttp.FormData()
        for i in range(fields):
            f.add_field(f"f{i}", "x" * size)
        f.add_field("audio", wav_bytes(1.0), filename="clip.wav", content_type="audio/wav")
        f.add_field("voice_id", "v")
        f.add_field("x_vector_only", "true")
        resp = await client.post("/api/v1/voices", data=f)
        assert resp.status == 413 and (await resp.json())["code"] == "BODY_TOO_LARGE"


# ---- item 8: same origin does not trust Host alone ----------------------------------------------
async def test_dns_rebinding_host_is_not_same_origin_without_auth():
    async with serve(voices=VOICES) as client:
        port = client.port
        evil = {"Origin": f"http://evil.example:{port}", "Host": f"evil.example:{port}"}
        resp = await client.post("/v1/audio/speech", headers=evil, json={"input": "Hi.", "voice": "anna"})
        assert resp.status == 403 and (await resp.json())["code"] == "FORBIDDEN"
        # the page served on a literal address is still its own origin
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            ok = await client.post("/v1/audio/speech", headers={"Origin": f"http://{host}", "Host": host},
                                   json={"input": "Hi.", "voice": "anna", "response_format": "pcm"})
            assert ok.status == 200, (host, ok.status)


async def test_a_named_host_is_same_origin_when_tokens_guard_the_server_or_it_is_allowed():
    headers = {"Origin": "http://tts.example:80", "Host": "tts.example:80", "Authorization": "Bearer t"}
    body = {"input": "Hi.", "voice": "anna", "response_format": "pcm"}
    async with serve(voices=VOICES, auth_tokens=frozenset({"t"})) as client:
        assert (await client.post("/v1/audio/speech", headers=headers, json=body)).status == 200
    async with serve(voices=VOICES, allowed_origins=frozenset({"http://tts.example:80"})) as client:
        assert (await client.post("/v1/audio/speech", headers=headers, json=body)).status == 200


# ---- item 9: CORS on the HTTP routes ------------------------------------------------------------
APP = "https://app.example"


async def test_a_preflight_from_an_allowed_origin_is_answered_before_the_token_check():
    async with serve(voices=VOICES, auth_tokens=frozenset({"t"}), allowed_origins=frozenset({APP})) as client:
        pre = await client.options("/v1/audio/speech", headers={
            "Origin": APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status == 204, pre.status
        assert pre.headers["Access-Control-Allow-Origin"] == APP
        assert "POST" in pre.headers["Access-Control-Allow-Methods"]
        assert "authorization" in pre.headers["Access-Control-Allow-Headers"].lower()
        resp = await client.post("/v1/audio/speech", headers={"Origin": APP, "Authorization": "Bearer t"},
                                 json={"input": "Hi.", "voice": "anna", "response_format": "pcm"})
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == APP
        assert "X-Sample-Rate" in resp.headers["Access-Control-Expose-Headers"]
        # a coded refusal is readable by the page too
        denied = await client.get("/api/v1/voices", headers={"Origin": APP})
        assert denied.status == 401 and denied.headers["Access-Control-Allow-Origin"] == APP


async def test_a_preflight_from_another_origin_is_refused_and_no_cors_headers_leak():
    async with serve(voices=VOICES, allowed_origins=frozenset({APP})) as client:
        pre = await client.options("/v1/audio/speech", headers={"Origin": "https://evil.example",
                                                                 "Access-Control-Request-Method": "POST"})
        assert pre.status == 403 and (await pre.json())["code"] == "FORBIDDEN"
        assert "Access-Control-Allow-Origin" not in pre.headers


# ---- item 10: whole-file requests --------------------------------------------------------------
@contextlib.asynccontextmanager
async def production_runner(engine, **settings):
    """The app under AppRunner's defaults, as ``web.run_app`` serves it: aiohttp's TestServer cancels a
    handler when its client goes (handler_cancellation=True), which production does not do."""
    app = create_app(engine, ServerSettings(**settings))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    await app[STATE].voices.create(engine, "anna", "anna", wav_bytes(1.0), None, True, "auto", 30.0)
    try:
        yield app, site._server.sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


async def test_an_abandoned_whole_file_request_is_cancelled_when_the_client_goes():
    engine = FakeEngine(chunk_delay=0.05, chunk_frames=(1,))  # "w" * 180: 60 one-frame chunks, ~3 s
    async with production_runner(engine) as (app, port):
        body = json.dumps({"input": "w" * 180, "voice": "anna", "response_format": "mp3"}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        for _ in range(100):
            if engine.blocks:
                break
            await asyncio.sleep(0.01)
        assert engine.blocks, "the request never started"
        writer.close()
        state = app[STATE]
        for _ in range(40):  # 1 s: well before the 3 s it would take to generate to the end
            if not engine.blocks and state.active == 0:
                break
            await asyncio.sleep(0.025)
        assert not engine.blocks and state.active == 0, (engine.blocks, state.active)


async def test_whole_file_encoding_runs_off_the_event_loop(monkeypatch):
    from server import openai

    threads = []
    real = openai.encode_file

    def spy(*args):
        threads.append(threading.current_thread())
        return real(*args)
    monkeypatch.setattr(openai, "encode_file", spy)
    async with serve(voices=VOICES) as client:
        resp = await client.post("/v1/audio/speech",
                                 json={"input": "Hello.", "voice": "anna", "response_format": "flac"})
        assert resp.status == 200 and len(await resp.read()) > 0
    assert threads and threads[0] is not threading.main_thread(), threads


# ---- item 12: failed-auth throttling and a write deadline that sees the client read -------------
async def test_wrong_tokens_are_throttled_per_address_with_429_and_retry_after():
    async with serve(voices=VOICES, auth_tokens=frozenset({"right"})) as client:  # default: a burst of 20
        statuses = [(await client.get("/api/v1/voices", headers={"Authorization": f"Bearer guess{i}"})).status
                    for i in range(25)]
        assert statuses == [401] * 20 + [429] * 5, statuses
        throttled = await client.get("/api/v1/voices", headers={"Authorization": "Bearer right"})
        # refused before the token is looked at: a right guess looks like a wrong one while it lasts
        assert throttled.status == 429 and (await throttled.json())["code"] == "RATE_LIMITED"
        assert int(throttled.headers["Retry-After"]) >= 1


def ws_frame(msg: dict) -> bytes:
    """A masked client text frame, written by hand: the socket under it is one the test set up."""
    data, mask = json.dumps(msg).encode(), b"\x01\x02\x03\x04"
    head = bytes([0x81, 0x80 | len(data)]) if len(data) < 126 else bytes([0x81, 0xFE]) + len(data).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def test_a_client_that_never_reads_is_dropped_before_megabytes_of_audio_pile_up():
    engine = FakeEngine(chunk_delay=0.01, chunk_frames=(4,))  # ~1.5 MB/s of 16-bit audio
    async with serve(engine, voices=VOICES, write_timeout_s=1.0) as client:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # the client's side holds little
        sock.connect(("127.0.0.1", client.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /api/v1/speak HTTP/1.1\r\nHost: 127.0.0.1\r\n" + WS_UPGRADE + b"\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ws_frame({"type": "start", "voice": "anna"}) + ws_frame({"type": "speak", "text": "w" * 4000}))
        await writer.drain()
        state = client.server.app[STATE]
        for _ in range(200):
            if not state.sessions:
                break
            await asyncio.sleep(0.05)
        writer.close()
        assert not state.sessions, "the session that never reads was not dropped"
    # What went out unread before the drop: Linux autotuned the send buffer to ~4 MB (1008 frames were
    # measured); bounded by send_buffer_bytes it is a few hundred KB.
    unread = engine.frames_generated * 1920 * 2
    assert unread < 1_500_000, unread


async def test_a_delete_that_loses_the_race_to_another_replica_is_voice_not_found(tmp_path, monkeypatch):
    from server.voices import VoiceRegistry

    engine = FakeEngine()
    a, b = VoiceRegistry(tmp_path), VoiceRegistry(tmp_path)
    a.load()
    b.load()
    await a.create(engine, "anna", "anna", wav_bytes(1.0), None, True, "auto", 30.0)
    seen = b.info("anna")
    assert seen is not None
    # B read the manifest just before A's delete renamed the folder away.
    monkeypatch.setattr(b, "_read", lambda folder: seen)
    await a.delete("anna")
    with pytest.raises(P.ProtocolError) as e:
        await b.delete("anna")
    assert e.value.code == P.VOICE_NOT_FOUND
