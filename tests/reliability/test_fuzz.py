"""Hostile input, fuzzed with hypothesis against one live server (fake engine): any text and any
JSON, message-shaped objects with wild field values, binary frames, huge fields, damaged audio and
decompression bombs, voice ids with path tricks, the OpenAI route, and malformed WebSocket frames.

Every input must be answered in a coded way (fuzzprobe.check_answer) in bounded time, the session
must survive whatever is not a protocol violation, and afterwards the server has logged no ERROR,
holds no slot, session or engine request, and wrote no file outside its voices folder.
Each case runs ``quick`` examples in the default run and ``thorough`` in the slow one.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import protocol as P
from server.state import OPENAI_VOICES
from tests.reliability import rawws
from tests.reliability import strategies as S
from tests.reliability.bgserver import BackgroundServer
from tests.reliability.fuzzprobe import CODED_CLOSES, CODES, check_answer, exchange
from tests.reliability.inproc import VOICE
from tests.server.fake_engine import FakeEngine

START = {"type": "start", "voice": VOICE}
AUDIO_CODES = {P.INVALID_AUDIO, P.AUDIO_TOO_LONG, P.AUDIO_TOO_LARGE}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "outside.txt").write_text("must stay as it is")
    srv = BackgroundServer(FakeEngine(), voices_dir=root / "voices", max_messages_per_s=0)
    srv.root = root
    yield srv
    srv.close()


def run(coro):
    return asyncio.run(coro)


# ---- the cases: a strategy and what one example must satisfy ------------------------------------
def any_text(server, text: str) -> None:
    a = run(exchange(server.url + "/api/v1/speak", [text]))
    check_answer(a)
    assert a.survived and (a.errors or any(m["type"] == "ready" for m in a.messages)), a


def any_json(server, value_and_started) -> None:
    value, started = value_and_started
    a = run(exchange(server.url + "/api/v1/speak", [S.dumps(value)], START if started else None))
    check_answer(a)
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        assert a.errors == [P.INVALID_MESSAGE] and a.survived, a


def message(server, msg: dict) -> None:
    check_answer(run(exchange(server.url + "/api/v1/speak", [S.dumps(msg)], START)))


def first_message(server, msg: dict) -> None:
    check_answer(run(exchange(server.url + "/api/v1/speak", [S.dumps(msg)])))


def binary_frame(server, data: bytes) -> None:
    a = run(exchange(server.url + "/api/v1/speak", [data], START))
    assert a.survived and a.errors == [P.UNSUPPORTED], a


def damaged_audio(server, audio: bytes) -> None:
    start = {"type": "start", "voice": {"ref_audio": S.b64(audio), "x_vector_only": True}}
    a = run(exchange(server.url + "/api/v1/speak", [S.dumps(start)]))
    check_answer(a)
    assert a.survived and (set(a.errors) <= AUDIO_CODES | {P.INVALID_MESSAGE}), a


def voice_id(server, trick: str) -> None:
    a = run(exchange(server.url + "/api/v1/speak", [S.dumps({"type": "start", "voice": trick})]))
    check_answer(a)
    # Ids fold case and surrounding space (" RELIABLE" is the registered voice); OpenAI's names get
    # the built-in voice. Anything else is refused.
    folded = trick.strip().lower()
    assert a.survived and (a.errors in ([P.VOICE_NOT_FOUND], [P.INVALID_MESSAGE])
                           or ((folded == VOICE or folded in OPENAI_VOICES) and not a.errors)), a
    run(voice_routes(server, trick))


async def voice_routes(server, trick: str) -> None:
    async with aiohttp.ClientSession() as http:
        for method in ("GET", "DELETE") if trick != VOICE else ():  # never delete the voice the others use
            async with http.request(method, server.url + "/api/v1/voices/" + quote(trick, safe="")) as r:
                assert r.status in (404, 405), (method, trick, r.status)
                if r.content_type == "application/json":
                    assert (await r.json())["code"] == P.VOICE_NOT_FOUND
        body = {"voice_id": trick, "name": "x", "ref_audio": S.b64(S.CLIPS[0]), "x_vector_only": True}
        async with http.post(server.url + "/api/v1/voices", json=body) as r:
            j = await r.json()
            assert r.status in (201, 400, 409) and (r.status == 201 or j["code"] in CODES), (trick, r.status, j)
            if r.status == 201:  # created under a well-formed id (given, or made from the name): remove it
                assert P.VOICE_ID.match(j["voice_id"]), (trick, j)
                await http.delete(server.url + "/api/v1/voices/" + j["voice_id"])


def http_speech(server, body: dict) -> None:
    async def go() -> None:
        async with aiohttp.ClientSession() as http, http.post(server.url + "/v1/audio/speech",
                                                              data=S.dumps(body).encode(),
                                                              headers={"Content-Type": "application/json"}) as r:
            data = await r.read()
            if r.status == 200:
                return
            err = json.loads(data)
            assert err["code"] in CODES and P.HTTP_STATUS[err["code"]] == r.status, (r.status, err)

    asyncio.run(asyncio.wait_for(go(), 15))


def raw_frame(server, spec) -> None:
    opcode, rsv, fin, mask, payload = spec

    async def go() -> None:
        reader, writer, head = await rawws.connect(server.port)
        assert b" 101 " in head.split(b"\r\n")[0], head
        try:
            writer.write(rawws.frame(opcode, payload, fin=fin, mask=mask, rsv=rsv))
            writer.write(rawws.text('{"type": "fuzz-sentinel"}'))
            await writer.drain()
        except ConnectionError:
            pass
        while True:
            try:
                op, data = await rawws.read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                raise AssertionError("the server hung up without a close frame") from None
            if op == 0x8:  # close: must carry a protocol close code (or echo the client's own close)
                code = rawws.close_code(data)
                assert code in CODED_CLOSES or opcode == 0x8, (spec, code)
                break
            if op == 0x1 and b"fuzz-sentinel" in data:
                break
        writer.close()

    asyncio.run(asyncio.wait_for(go(), 15))


@dataclass
class Case:
    name: str
    strategy: st.SearchStrategy
    check: Callable
    quick: int
    thorough: int


CASES = [
    Case("any_text", st.text(max_size=300), any_text, 150, 1500),
    Case("any_json", st.tuples(S.json_value, st.booleans()), any_json, 150, 1500),
    Case("message_after_start", S.messages, message, 150, 1500),
    Case("start_message", S.starts, first_message, 150, 1500),
    Case("binary_frame", st.binary(max_size=2048), binary_frame, 50, 300),
    Case("damaged_audio", S.damaged_audio(), damaged_audio, 100, 1000),
    Case("voice_id", st.sampled_from(S.PATH_TRICKS + [VOICE]) | st.text(max_size=70), voice_id, 100, 1000),
    Case("http_speech", st.fixed_dictionaries({}, optional={k: S.wild for k in (
        "input", "voice", "response_format", "stream_format", "stream", "speed", "seed", "language", "ref_audio",
        "ref_text", "x_vector_only", "model", "instructions")}), http_speech, 150, 1500),
    Case("raw_frame", S.raw_frames, raw_frame, 150, 1500),
]


def fuzz(server, case: Case, n: int, report) -> None:
    t0, rss0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    examples = hangs = 0

    @settings(max_examples=n, deadline=None, database=None, derandomize=n == case.quick,
              suppress_health_check=list(HealthCheck))
    @given(case.strategy)
    def body(value) -> None:
        nonlocal examples, hangs
        examples += 1
        try:
            case.check(server, value)
        except asyncio.TimeoutError:  # every exchange runs under a time limit: running out of it is a hang
            hangs += 1
            raise

    body()
    left = server.settle()
    files = sorted(str(p.relative_to(server.root)) for p in server.root.rglob("*") if p.is_file())
    report.update({"case": case.name, "examples": examples, "duration_s": round(time.monotonic() - t0, 1),
                   "crashes": len(server.errors.records), "hangs": hangs, "left_over": sum(left.values()),
                   "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)})
    assert not server.errors.records, server.errors.records[:3]
    assert not any(left.values()), left
    assert (server.root / "outside.txt").read_text() == "must stay as it is"
    assert all(f == "outside.txt" or f.startswith("voices/reliable/") for f in files), files


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fuzz(server, case: Case, report) -> None:
    fuzz(server, case, case.quick, report)


@pytest.mark.slow
@pytest.mark.timeout(280)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fuzz_thorough(server, case: Case, report) -> None:
    fuzz(server, case, case.thorough, report)


# ---- fixed hostile inputs: limits at and over their edge, and the bombs ---------------------------
HUGE = [
    ("reference_samples_at_1e30", [S.dumps({"type": "start", "voice": {"ref_audio": S.b64(S.loud_float_wav()),
                                                                       "x_vector_only": True}})], None,
     [P.INVALID_AUDIO]),
    ("text_over_limit", [S.dumps({"type": "speak", "text": "a" * 4097})], START, [P.TEXT_TOO_LONG]),
    ("text_100k", [S.dumps({"type": "speak", "text": "a" * 100_000})], START, [P.TEXT_TOO_LONG]),
    ("id_200_chars", [S.dumps({"type": "speak", "id": "i" * 200, "text": "Hi."})], START, [P.INVALID_MESSAGE]),
    ("append_without_end", [S.dumps({"type": "append", "text": "word " * 4000})] * 2, START, [P.TEXT_TOO_LONG]),
    ("nested_100k_deep", ["[" * 100_000 + "]" * 100_000], None, [P.INVALID_MESSAGE]),
    ("number_1e400", ['{"type":"start","voice":"reliable","sampling":{"temperature":1e400}}'], None,
     [P.INVALID_MESSAGE]),
    ("nan_literal", ['{"type":"start","voice":"reliable","sampling":{"top_p":NaN}}'], None, [P.INVALID_MESSAGE]),
    ("lone_surrogate_text", ['{"type":"speak","text":"\\ud800 hi"}'], START, [P.INVALID_MESSAGE]),
    ("lone_surrogate_append", ['{"type":"append","text":"\\udfff."}'], START, [P.INVALID_MESSAGE]),
    ("temperature_1e-300", [S.dumps({"type": "start", "voice": VOICE, "sampling": {"temperature": 1e-300}})], None,
     [P.INVALID_MESSAGE]),
    ("repetition_penalty_1e-300", [S.dumps({"type": "start", "voice": VOICE,
                                            "sampling": {"repetition_penalty": 1e-300}})], None, [P.INVALID_MESSAGE]),
    ("voice_name_10k", [S.dumps({"type": "start", "voice": "v" * 10_000})], None, [P.VOICE_NOT_FOUND]),
    ("base64_over_upload_limit", [S.dumps({"type": "start", "voice": {"ref_audio": "A" * (8 * 2**20 * 4 // 3 + 8),
                                                                       "x_vector_only": True}})], None,
     [P.AUDIO_TOO_LARGE]),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frames,start,codes", [h[1:] for h in HUGE], ids=[h[0] for h in HUGE])
def test_huge_and_malformed_fields_get_their_code(server, frames, start, codes) -> None:
    a = run(exchange(server.url + "/api/v1/speak", frames, start))
    check_answer(a)
    assert a.survived and a.errors[:1] == codes, a
    assert not server.errors.records, server.errors.records[:3]


def test_a_frame_over_the_message_limit_closes_1009(server) -> None:
    """Refused on its header: the server closes with 1009 before reading the payload."""
    limit = server.state.settings.ws_max_message_bytes

    async def go() -> int | None:
        reader, writer, _ = await rawws.connect(server.port)
        # The header declares one byte over the limit; only the first 64 KiB of payload follow.
        writer.write(rawws.frame(0x1, b"", length=limit + 1) + b"x" * 65536)
        await writer.drain()
        while True:
            op, data = await rawws.read_frame(reader)
            if op == 0x8:
                writer.close()
                return rawws.close_code(data)

    assert asyncio.run(asyncio.wait_for(go(), 15)) == 1009


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(S.bombs()))
def test_decompression_bombs_are_refused_before_decoding(server, name: str, report) -> None:
    start = {"type": "start", "voice": {"ref_audio": S.b64(S.bombs()[name]), "x_vector_only": True}}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    a = run(exchange(server.url + "/api/v1/speak", [S.dumps(start)]))
    seconds = time.monotonic() - t0
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    report.update({"bomb": name, "bytes_sent": len(S.bombs()[name]), "answer": a.errors[:1],
                   "seconds": round(seconds, 2), "peak_rss_growth_mb": round(growth_mb)})
    if name == "wav_header_claims_2GiB":  # libsndfile reads the 1 s that is really there: a usable clip
        assert a.survived and not a.errors, a
    else:
        assert a.survived and a.errors and a.errors[0] in AUDIO_CODES, a
    assert seconds < 5 and growth_mb < 100, (seconds, growth_mb)

