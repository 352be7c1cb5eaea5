"""Fuzz what reaches the real engine (tiny random checkpoint): every start option the protocol
accepts, at the edges of its range, and speak text drawn from all of Unicode (lone surrogates
included, as JSON escapes). Each utterance must end in ``complete`` or a coded error; afterwards
the engine thread is alive, nothing is left in the engine, and nothing logged an ERROR.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import protocol as P
from tests.reliability.bgserver import BackgroundServer
from tests.reliability.fuzzprobe import check_message
from tests.reliability.inproc import VOICE
from tests.reliability.strategies import b64, dumps, loud_float_wav, surrogates

edges = st.sampled_from
sampling = st.fixed_dictionaries({}, optional={
    "greedy": st.booleans(), "seed": st.integers(0, 2**63 - 1) | edges([0, 2**63 - 1]),
    "temperature": st.floats(0.01, 100.0) | edges([0.01, 100.0]), "top_k": st.integers(0, 2**31 - 1) | edges([0, 1]),
    "top_p": st.floats(1e-300, 1.0, exclude_min=False) | edges([1e-300, 1.0]),
    "repetition_penalty": st.floats(0.01, 100.0) | edges([0.01, 100.0])})
with_surrogate = st.tuples(st.text(max_size=20), surrogates, st.text(max_size=20)).map("".join)
texts = (st.text(min_size=1, max_size=120) | with_surrogate
         | edges(["\u200b", "。", "🙂" * 40, "\u202e" * 30, "a\u0301" * 60, "\x00\x01\x02 hi", " . ", "1" * 300]))


@st.composite
def requests(draw, languages: list[str]):
    start = {"type": "start", "voice": VOICE, "sampling": draw(sampling), "max_frames": draw(st.integers(1, 3)),
             "language": draw(st.one_of(*[st.sampled_from(languages)] * 4, st.text(max_size=12))),
             "encoding": draw(st.sampled_from(P.ENCODINGS)), "priority": draw(st.sampled_from(list(P.PRIORITIES))),
             "non_streaming_text": draw(st.booleans())}
    return start, draw(texts)


@pytest.fixture(scope="module")
def server(tiny_engine_shared):
    srv = BackgroundServer(tiny_engine_shared, max_messages_per_s=0)
    yield srv
    srv.close()


async def utterance(url: str, start: dict, text: str) -> str:
    """Start, speak, and wait for the utterance's end; returns how it ended."""
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_str(dumps(start))
        first = await ws.receive_json()
        check_message(first)
        if first["type"] == "error":
            return first["code"]
        await ws.send_str(dumps({"type": "speak", "id": "f", "text": text}))
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                m = json.loads(msg.data)
                check_message(m)
                if m["type"] in ("complete", "error"):
                    assert m.get("id") == "f", m
                    return m["type"] if m["type"] == "complete" else m["code"]
        raise AssertionError(f"the socket ended before the utterance did: {ws.close_code}")


def fuzz_engine(server, n: int, report) -> None:
    engine = server.engine
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()

    @settings(max_examples=n, deadline=None, database=None, derandomize=n <= 150,
              suppress_health_check=list(HealthCheck))
    @given(requests(engine.languages))
    def body(req) -> None:
        start, text = req
        end = asyncio.run(asyncio.wait_for(utterance(server.url + "/api/v1/speak", start, text), 60))
        outcomes[end] = outcomes.get(end, 0) + 1
        assert end == "complete" or end in (P.INVALID_MESSAGE, P.UNSUPPORTED, P.TEXT_TOO_LONG), end
        assert engine._thread.is_alive(), "the engine thread died"

    body()
    left = server.settle()
    report.update({"engine": "real", "examples": sum(outcomes.values()), "outcomes": outcomes,
                   "duration_s": round(time.monotonic() - t0, 1), "crashes": len(server.errors.records),
                   "engine_alive": engine._thread.is_alive(), "blocks_leaked": left["kv_blocks_used"],
                   "left_over": sum(left.values())})
    assert not server.errors.records, server.errors.records[:3]
    assert not any(left.values()), left


@pytest.mark.timeout(120)
def test_fuzz_real_engine(server, report) -> None:
    fuzz_engine(server, 150, report)


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_fuzz_real_engine_thorough(server, report) -> None:
    fuzz_engine(server, 1500, report)


@pytest.mark.timeout(60)
def test_a_reference_clip_far_outside_range_is_refused_and_others_go_on(server, report) -> None:
    """A float WAV at 1e30 decodes fine but gives a NaN speaker embedding; used, it would make the
    logits NaN and fail the engine step (and the requests batched with it). It must be refused."""
    url = server.url + "/api/v1/speak"
    loud = {"type": "start", "voice": {"ref_audio": b64(loud_float_wav()), "x_vector_only": True}}

    async def both() -> tuple[str, str]:
        async def refused() -> str:
            async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
                await ws.send_str(dumps(loud))
                return (await ws.receive_json())["code"]

        return await asyncio.gather(refused(), utterance(url, {"type": "start", "voice": VOICE, "max_frames": 3},
                                                         "Still here."))

    code, other = asyncio.run(asyncio.wait_for(both(), 30))
    report.update({"loud_reference": code, "concurrent_utterance": other, "crashes": len(server.errors.records)})
    assert code == P.INVALID_AUDIO and other == "complete"
    assert not server.errors.records, server.errors.records[:3]
