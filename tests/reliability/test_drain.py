"""SIGTERM on a replica process: not ready, new sessions refused (HTTP 503 before the upgrade,
close 1013 for a socket that starts too late), running utterances finish, idle sockets are sent
away with 1001, exit 0; a deadline cuts what runs too long; a second SIGTERM exits at once.

The replica is ``tests.reliability.fake_replica``: the production app and lifecycle around the
fake engine, so a stream lasts exactly as long as the test needs.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.reliability.client import problem, run_session
from tests.reliability.procs import fake_replica, wait_ready
from tests.server.conftest import b64, wav_bytes

START = {"type": "start", "voice": {"ref_audio": b64(wav_bytes(0.5)), "x_vector_only": True}}
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


async def started(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(url)
    await ws.send_json(START)
    assert (await ws.receive_json(timeout=10))["type"] == "ready"
    return ws


async def until_not_ready(http: aiohttp.ClientSession, base: str) -> None:
    while (await http.get(base + "/ready")).status != 503:
        await asyncio.sleep(0.01)


async def sigterm_while_speaking(http: aiohttp.ClientSession, replica, text: str) -> asyncio.Future:
    """Once the replica is ready, start one long utterance, let it stream for a second, then SIGTERM
    the replica; returns the utterance's running session."""
    await wait_ready(http, replica)
    speaking = asyncio.ensure_future(run_session(http, replica.url + "/api/v1/speak", START, [text], timeout=30))
    await asyncio.sleep(1.0)
    replica.sigterm()
    return speaking


async def exit_code(proc, timeout: float) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, proc.wait, timeout)


@pytest.mark.timeout(60)
async def test_sigterm_refuses_new_sessions_finishes_running_ones_and_exits_0(tmp_path, report):
    replica = fake_replica(tmp_path, "r", "--chunk-delay", "0.04", "--drain-timeout", "20")
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, replica)
            url = replica.url + "/api/v1/speak"
            # ~130 frames: 35 chunks of 40 ms, about 1.4 s of streaming.
            flowing = asyncio.Event()
            speaking = asyncio.ensure_future(run_session(http, url, START, ["Long enough to outlive the drain. " * 12],
                                                         timeout=30, on_first_audio=flowing.set))
            idle = await started(http, url)
            late = await http.ws_connect(url)  # upgraded before the signal, starts after it
            await asyncio.wait_for(flowing.wait(), 10)
            replica.sigterm()
            await until_not_ready(http, replica.url)
            ready = await (await http.get(replica.url + "/ready")).json()
            health = (await http.get(replica.url + "/health")).status
            refused = await http.get(url, headers=UPGRADE)
            refused_body = await refused.json()
            speech = await http.post(replica.url + "/v1/audio/speech", json={"input": "Hi.", "response_format": "pcm",
                                                                             "ref_audio": START["voice"]["ref_audio"],
                                                                             "x_vector_only": True})
            await late.send_json(START)
            late_error = await late.receive_json(timeout=5)
            late_close = await late.receive(timeout=5)
            idle_close = await idle.receive(timeout=10)
            idle_closed_after = time.monotonic() - replica.sigterm_at
            result = await speaking
            code = await exit_code(replica.proc, 30)
            drain_s = time.monotonic() - replica.sigterm_at
        report.update({"running_streams_lost": 0 if problem(result.utterances[0], None) is None else 1,
                       "refused_handshake_status": refused.status, "late_start_close": late_close.data,
                       "idle_close": idle_close.data, "idle_closed_after_s": round(idle_closed_after, 2),
                       "exit_code": code, "drain_s": round(drain_s, 2)})
        assert ready == {"ready": False, "reason": "draining"} and health == 200
        assert refused.status == 503 and refused_body["code"] == "TTS_UNAVAILABLE" and refused.headers["Retry-After"]
        assert speech.status == 503 and speech.headers["Retry-After"] == "1"
        assert late_error["code"] == "TTS_UNAVAILABLE"
        assert late_close.type == aiohttp.WSMsgType.CLOSE and late_close.data == 1013
        # Idle sockets go (1001) while work is still running, so their clients move on early.
        assert idle_close.type == aiohttp.WSMsgType.CLOSE and idle_close.data == 1001 and idle_closed_after < 5
        assert result.failure is None and problem(result.utterances[0], None) is None, result
        assert result.close_code in (1000, 1001)
        assert code == 0, replica.output()[-3000:]
        assert "drained" in replica.output()
    finally:
        replica.stop()


@pytest.mark.timeout(60)
async def test_drain_deadline_cuts_a_stream_that_runs_too_long_and_still_exits_0(tmp_path, report):
    replica = fake_replica(tmp_path, "r", "--chunk-delay", "0.1", "--drain-timeout", "1")
    try:
        async with aiohttp.ClientSession() as http:
            # ~330 frames: ~85 chunks of 100 ms, far past the 1 s deadline.
            speaking = await sigterm_while_speaking(http, replica, "This will not finish in time. " * 33)
            result = await speaking
            code = await exit_code(replica.proc, 30)
            exit_s = time.monotonic() - replica.sigterm_at
        report.update({"cut_close_code": result.close_code, "exit_code": code,
                       "exit_after_sigterm_s": round(exit_s, 2)})
        assert result.utterances[0].final is None and result.close_code == 1001, result
        assert code == 0 and exit_s < 10, replica.output()[-3000:]
        assert "drain deadline" in replica.output()
    finally:
        replica.stop()


@pytest.mark.timeout(60)
async def test_a_second_sigterm_stops_waiting(tmp_path, report):
    replica = fake_replica(tmp_path, "r", "--chunk-delay", "0.1", "--drain-timeout", "60")
    try:
        async with aiohttp.ClientSession() as http:
            speaking = await sigterm_while_speaking(http, replica, "A long one that the second signal cuts. " * 25)
            await until_not_ready(http, replica.url)
            replica.proc.send_signal(15)
            code = await exit_code(replica.proc, 30)
            exit_s = time.monotonic() - replica.sigterm_at
            result = await speaking
        report.update({"exit_code": code, "exit_after_first_sigterm_s": round(exit_s, 2),
                       "cut_close_code": result.close_code})
        assert code == 0 and exit_s < 10
        assert result.close_code == 1001
    finally:
        replica.stop()
