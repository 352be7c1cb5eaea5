"""Sequences of bad requests and disconnects over every route, against one live server: the fake
engine (every route, fast) and the real engine on the tiny checkpoint (its admission is where a
bad seed once leaked a slot forever, issue #13).

Each example is a list of steps: a WebSocket session with a wild start and wild messages, left
politely or cut off; an OpenAI speech request with wild fields (seeds outside int64 included),
read to the end or abandoned after its first bytes; voice routes with wild ids and JSON or
multipart bodies (damaged clips included); headers no parser expects; the open routes. After
every sequence the invariant behind item 1 must hold: no session, slot, running engine request or
KV block is left, and /health answers 200. A step that does not finish in its time limit is
counted as a hang (measured, reported, and must be 0).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from server import protocol as P
from tests.reliability import strategies as S
from tests.reliability.bgserver import BackgroundServer
from tests.reliability.fuzzprobe import CODES, SENTINEL, check_message
from tests.reliability.inproc import VOICE
from tests.server.fake_engine import FakeEngine

STEP_TIMEOUT_S = 15.0
SEEDS = st.sampled_from([2**64, -2**63 - 1, -1, 2**63, 2**63 - 1, 0, 10**400, 1.5, "7", None])
FORMATS = st.sampled_from(["pcm", "wav", "mp3", "flac", "opus"]) | S.wild
TEXTS = st.text(min_size=1, max_size=40) | S.wild
BAD_HEADERS = [{"Origin": "http://["}, {"Origin": "http://evil.example"}, {"Authorization": "Bearer \udcff"},
               {"Origin": "null"}, {"Content-Type": "application/json; charset=bogus"}]

ws_step = st.tuples(st.just("ws"), st.fixed_dictionaries(
    {"type": st.just("start"), "voice": st.just(VOICE) | S.wild},
    optional={"sampling": S.sampling | st.fixed_dictionaries({"seed": SEEDS}), "max_frames": st.just(3) | S.wild,
              "language": S.wild, "encoding": S.wild}),
    st.lists(S.messages, max_size=3), st.booleans())
http_step = st.tuples(st.just("http"), st.fixed_dictionaries(
    {"input": TEXTS, "voice": st.just(VOICE), "seed": SEEDS | S.wild},
    optional={"response_format": FORMATS, "stream_format": S.wild, "stream": st.booleans() | S.wild, "speed": S.wild,
              "language": S.wild, "ref_audio": S.wild, "x_vector_only": S.wild}), st.booleans())
voice_step = st.tuples(st.just("voice"), st.sampled_from(["GET", "DELETE", "POST"]),
                       st.sampled_from(S.PATH_TRICKS) | st.text(max_size=70), S.wild)
header_step = st.tuples(st.just("headers"), st.sampled_from(["/v1/audio/speech", "/api/v1/voices", "/api/v1/speak"]),
                        st.sampled_from(range(len(BAD_HEADERS))))
form_step = st.tuples(st.just("form"), st.dictionaries(st.sampled_from(["name", "voice_id", "transcript",
                                                                         "x_vector_only", "language", "bogus"])
                                                        | st.text("abcxyz_-0", max_size=8),  # names aiohttp will send
                                         st.text(max_size=60), max_size=6),
                      st.none() | S.damaged_audio() | st.sampled_from(S.CLIPS))
open_step = st.tuples(st.just("open"), st.sampled_from(["/health", "/ready", "/metrics", "/api/v1/info", "/speak",
                                                        "/", "/static/../server/app.py", "/nothing"]))
sequences = st.lists(ws_step | http_step | voice_step | header_step | form_step | open_step, min_size=1, max_size=6)


async def ws(url: str, start: dict, frames: list[dict], cut: bool) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "/api/v1/speak", max_msg_size=0) as sock:
        await sock.send_str(S.dumps(start))
        for f in frames:
            await sock.send_str(S.dumps(f))
        if cut:  # gone without a word, whatever the server was doing for it
            return
        await sock.send_str(SENTINEL)
        survived = False
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                m = json.loads(msg.data)
                check_message(m)
                if m.get("type") == "error" and "fuzz-sentinel" in m["message"]:
                    survived = True
                    break
        assert survived or sock.close_code is not None, "no coded answer"


async def speech(url: str, body: dict, cut: bool) -> None:
    async with aiohttp.ClientSession() as http, http.post(url + "/v1/audio/speech", data=S.dumps(body).encode(),
                                                          headers={"Content-Type": "application/json"}) as r:
        if r.status == 200:
            if cut:
                await r.content.read(64)
                r.close()  # abandoned mid-body
            else:
                await r.read()
            return
        err = json.loads(await r.read())
        assert err["code"] in CODES and P.HTTP_STATUS[err["code"]] == r.status, (r.status, err)


async def voice(url: str, method: str, voice_id: str, extra: object) -> None:
    if voice_id == VOICE:
        return  # never delete the voice the other steps use
    async with aiohttp.ClientSession() as http:
        if method == "POST":
            body = {"voice_id": voice_id, "ref_audio": S.b64(S.CLIPS[0]), "x_vector_only": True, "name": extra}
            async with http.post(url + "/api/v1/voices", data=S.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}) as r:
                j = await r.json()
                assert r.status == 201 or j["code"] in CODES, (r.status, j)
                if r.status == 201:
                    await http.delete(url + "/api/v1/voices/" + j["voice_id"])
            return
        from urllib.parse import quote

        async with http.request(method, url + "/api/v1/voices/" + quote(voice_id, safe="")) as r:
            assert r.status in (404, 405), (method, voice_id, r.status)


async def form(url: str, fields: dict[str, str], audio: bytes | None) -> None:
    data = aiohttp.FormData()
    for k, v in fields.items():
        data.add_field(k, v)
    if audio is not None:
        data.add_field("audio", audio, filename="clip.bin", content_type="application/octet-stream")
    async with aiohttp.ClientSession() as http, http.post(url + "/api/v1/voices", data=data) as r:
        j = await r.json()
        assert r.status == 201 or (j["code"] in CODES and P.HTTP_STATUS[j["code"]] == r.status), (r.status, j)
        if r.status == 201 and j["voice_id"] != VOICE:
            await http.delete(url + "/api/v1/voices/" + j["voice_id"])


async def open_route(url: str, path: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(url + path, allow_redirects=False) as r:
        await r.read()
        assert r.status < 500 or (path == "/ready" and r.status == 503), (path, r.status)


async def headers(port: int, path: str, which: int) -> None:
    head = "".join(f"{k}: {v}\r\n" for k, v in BAD_HEADERS[which].items()).encode("utf-8", "surrogateescape")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
                     "Content-Length: 2\r\n".encode() + head + b"\r\n{}")
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1])
    assert status < 500 or status == 503, raw[:200]


async def step(server, s: tuple) -> None:
    url = server.url
    kind = s[0]
    if kind == "ws":
        await ws(url, *s[1:])
    elif kind == "http":
        await speech(url, *s[1:])
    elif kind == "voice":
        await voice(url, *s[1:])
    elif kind == "form":
        await form(url, *s[1:])
    elif kind == "open":
        await open_route(url, *s[1:])
    else:
        await headers(server.port, *s[1:])


async def health(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(url + "/health") as r:
        return r.status


def fuzz_sequences(server, n: int, report, engine_name: str) -> None:
    t0 = time.monotonic()
    counts = {"sequences": 0, "steps": 0, "hangs": 0}

    # No shrinking: a failing sequence is reported as drawn (shrinking re-runs hangs, 15 s each).
    @settings(max_examples=n, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate])
    @given(sequences)
    def body(seq) -> None:
        counts["sequences"] += 1
        for s in seq:
            counts["steps"] += 1
            try:
                asyncio.run(asyncio.wait_for(step(server, s), STEP_TIMEOUT_S))
            except asyncio.TimeoutError:
                counts["hangs"] += 1
                raise AssertionError(f"step hung for {STEP_TIMEOUT_S} s: {s!r:.300}") from None
        left = server.settle()
        assert not any(left.values()), (left, seq)
        assert asyncio.run(health(server.url)) == 200

    body()
    left = server.settle()
    report.update({"engine": engine_name, **counts, "duration_s": round(time.monotonic() - t0, 1),
                   "crashes": len(server.errors.records), "left_over": sum(left.values())})
    assert counts["hangs"] == 0
    assert not server.errors.records, server.errors.records[:3]


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    srv = BackgroundServer(FakeEngine(), voices_dir=tmp_path_factory.mktemp("seq") / "voices", max_messages_per_s=0)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def real_server(tiny_engine_shared):
    srv = BackgroundServer(tiny_engine_shared, max_messages_per_s=0)
    yield srv
    srv.close()


@pytest.mark.timeout(150)
def test_sequences_of_bad_requests_and_disconnects_leave_nothing_fake_engine(fake_server, report) -> None:
    fuzz_sequences(fake_server, 150, report, "fake")


@pytest.mark.timeout(200)
def test_sequences_of_bad_requests_and_disconnects_leave_nothing_real_engine(real_server, report) -> None:
    fuzz_sequences(real_server, 60, report, "real")


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_sequences_thorough_fake_engine(fake_server, report) -> None:
    fuzz_sequences(fake_server, 1000, report, "fake")


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_sequences_thorough_real_engine(real_server, report) -> None:
    fuzz_sequences(real_server, 300, report, "real")
