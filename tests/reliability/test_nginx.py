"""Two replicas behind the shipped nginx config; one is drained (SIGTERM) in the middle of a run.

50 sessions: a first wave of 30 spreads over both replicas (least_conn); once every one of them
has audio flowing, replica A gets SIGTERM; when A reports not-ready, a second wave of 20 opens.
Required: no session loses audio (the sessions on A finish their utterances, checked against
reference audio), every second-wave session lands on B (A's 503 is retried by nginx), A exits 0
after its drain, and B ends with no KV blocks in use.

Two engines: the fake one (default run, paced streams, seconds) and ``makima-tts serve --model
random:tiny`` (slow run: the real engine on CPU, the same 50 sessions).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.reliability.client import SessionResult, problem, reference_audio, run_session
from tests.reliability.nginx import Nginx, nginx_binary
from tests.reliability.procs import fake_replica, metrics, real_replica, wait_engine_idle, wait_ready
from tests.server.conftest import b64, wav_bytes

NGINX = nginx_binary()
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install -y nginx); "
                                                      "this test runs the real binary in front of two replicas")
WAVE1, WAVE2 = 30, 20
START = {"type": "start", "voice": {"ref_audio": b64(wav_bytes(1.0, sr=24000, freq=190.0)), "x_vector_only": True},
         "encoding": "pcm_s16le", "sampling": {"greedy": True}}
# Fake engine: frames = len(text) // 3, one chunk per --chunk-delay: ~1 s per utterance.
FAKE_TEXTS = [f"Replica drain utterance {i}: " + "a steady stream of words " * 10 for i in range(4)]
REAL_TEXTS = ["Hello there.", "A second, somewhat longer sentence to speak.", "Numbers one two three."]


async def drain_one_of_two(tmp_path, report, engine: str) -> None:
    texts = FAKE_TEXTS if engine == "fake" else REAL_TEXTS
    start_replica = fake_replica if engine == "fake" else real_replica
    extra = ("--chunk-delay", "0.03") if engine == "fake" else ()
    a, b = start_replica(tmp_path, "a", *extra), start_replica(tmp_path, "b", *extra)
    proxy: Nginx | None = None
    t_run = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(wait_ready(http, a), wait_ready(http, b))
            proxy = Nginx(NGINX, tmp_path, [a.addr, b.addr])
            await proxy.wait_up(http)
            ref = await reference_audio(http, a.url + "/api/v1/speak", START, texts)
            ws_url = proxy.url + "/api/v1/speak"

            flowing, all_flowing = 0, asyncio.Event()

            def first_audio() -> None:
                nonlocal flowing
                flowing += 1
                if flowing == WAVE1:
                    all_flowing.set()

            def session(i: int, on_first=None):
                return asyncio.ensure_future(run_session(http, ws_url, START, [texts[i % len(texts)]], timeout=180,
                                                         on_first_audio=on_first))

            wave1 = [session(i, first_audio) for i in range(WAVE1)]
            await asyncio.wait_for(all_flowing.wait(), 120)
            a.sigterm()
            while (await http.get(a.url + "/ready")).status != 503:  # A has taken the signal
                await asyncio.sleep(0.01)
            wave2 = [session(WAVE1 + i) for i in range(WAVE2)]
            results: list[SessionResult] = await asyncio.gather(*wave1, *wave2)
            a_exit = await asyncio.get_running_loop().run_in_executor(None, a.proc.wait, 60)
            drain_s = time.monotonic() - a.sigterm_at
            b_final = await wait_engine_idle(http, b.url)
            a_metrics_gone = True
            try:
                await metrics(http, a.url)
                a_metrics_gone = False
            except aiohttp.ClientConnectionError:
                pass

        lost = {}
        for i, r in enumerate(results):
            why = r.failure or problem(r.utterances[0], ref[r.utterances[0].text], tolerance=0 if engine == "fake"
                                       else 2)
            if why:
                lost[i] = f"{r.upstream}: {why}"
        on_a = [r for r in results[:WAVE1] if r.upstream == a.addr]
        # Sessions on A whose audio was flowing when A took the signal and ended after it.
        in_flight_on_a = sum(1 for r in on_a if r.utterances[0].final_at is not None
                             and r.utterances[0].first_audio_at < a.sigterm_at < r.utterances[0].final_at)
        wave2_on_b = sum(1 for r in results[WAVE1:] if r.upstream == b.addr)
        numbers = {"engine": engine, "sessions": len(results), "wave1_on_a": len(on_a),
                   "wave1_on_b": sum(1 for r in results[:WAVE1] if r.upstream == b.addr),
                   "a_streams_running_at_sigterm": in_flight_on_a, "wave2_on_b": wave2_on_b,
                   "streams_lost": len(lost), "a_exit_code": a_exit, "a_drain_s": round(drain_s, 2),
                   "b_kv_blocks_leaked": int(b_final.get("makima_tts:kv_blocks_used", -1)),
                   "nginx_marked_a_down": proxy.error_log().count("upstream server temporarily disabled"),
                   "duration_s": round(time.monotonic() - t_run, 1)}
        report.update(numbers)
        assert not lost, lost
        assert len(on_a) > 0 and numbers["wave1_on_b"] > 0, "least_conn should spread the first wave over both"
        assert in_flight_on_a > 0, "no stream was running on A when it was drained"
        assert wave2_on_b == WAVE2, [r.upstream for r in results[WAVE1:]]
        assert a_exit == 0, a.output()[-3000:]
        assert "draining" in a.output() and "drained" in a.output(), a.output()[-3000:]
        assert a_metrics_gone
        assert numbers["b_kv_blocks_leaked"] == 0 and b_final["makima_tts:num_requests_running"] == 0
    finally:
        if proxy is not None:
            proxy.stop()
        for r in (a, b):
            r.stop()


@pytest.mark.timeout(150)
async def test_drain_one_of_two_fake_replicas_behind_nginx(tmp_path, report):
    await drain_one_of_two(tmp_path, report, "fake")


@pytest.mark.slow
@pytest.mark.timeout(280)
async def test_drain_one_of_two_tiny_model_replicas_behind_nginx(tmp_path, report):
    await drain_one_of_two(tmp_path, report, "real")
