"""Requests that raise inside the engine, and an engine that stops producing.

With the fake engine: a request whose stream raises midway fails alone (SYNTHESIS_ERROR, its
session goes on), every other stream is complete and correct, every block is freed. A stuck
engine turns /health 503 so an orchestrator restarts the replica.

With the real engine: an exception while admitting one request, or in a step that batches it
with others (the engine retries the batchmates one by one), fails that request alone.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.reliability.client import problem, reference_audio, run_session
from tests.reliability.inproc import VOICE, live, settle
from tests.server.fake_engine import FakeEngine

POISON = "POISON"
START = {"type": "start", "voice": VOICE, "encoding": "pcm_s16le", "sampling": {"greedy": True}}
TEXTS = ["Hello there.", "Numbers one two three.", "A second, somewhat longer sentence to speak."]


class RaisingEngine(FakeEngine):
    """Streams a poisoned request's first chunks, then raises from inside its stream."""

    async def submit(self, request):
        n = 0
        async for item in super().submit(request):
            if POISON in request.text and n == 2:
                raise RuntimeError("injected engine failure")
            n += 1
            yield item


class StuckEngine(FakeEngine):
    """Accepts requests and never produces anything (a dead engine thread, a hung device)."""

    async def submit(self, request):
        await asyncio.Event().wait()
        yield  # an async generator, like the real one


async def isolation_run(client, ref: dict[str, bytes], n_good: int, n_bad: int, timeout: float) -> tuple[list, list]:
    url = str(client.make_url("/api/v1/speak"))
    async with aiohttp.ClientSession() as http:
        good = [run_session(http, url, START, [TEXTS[i % len(TEXTS)]], timeout=timeout) for i in range(n_good)]
        # A poisoned utterance, then a healthy one in the same session: the session must survive it.
        bad = [run_session(http, url, START, [f"{POISON} number {i}, raise inside the engine please.", TEXTS[0]],
                           timeout=timeout) for i in range(n_bad)]
        results = await asyncio.gather(*good, *bad)
    lost = [r.failure or problem(r.utterances[0], ref[r.utterances[0].text], 2) for r in results[:n_good]]
    poisoned = [(r.failure, r.utterances[0].final, problem(r.utterances[1], ref[TEXTS[0]], 2))
                for r in results[n_good:]]
    return [x for x in lost if x], poisoned


@pytest.mark.timeout(60)
async def test_a_request_that_raises_inside_the_engine_fails_alone(report):
    engine = RaisingEngine(chunk_delay=0.005)
    async with live(engine, expected_errors=("injected engine failure",), max_messages_per_s=0) as (client, state,
                                                                                                    errors):
        async with aiohttp.ClientSession() as http:
            ref = await reference_audio(http, str(client.make_url("/api/v1/speak")), START, TEXTS)
        lost, poisoned = await isolation_run(client, ref, 30, 6, 30)
        left, _ = await settle(state)
        report.update({"engine": "fake", "healthy_sessions": 30, "raising_requests": 6, "healthy_lost": len(lost),
                       "blocks_leaked": left["kv_blocks_used"], "left_over": sum(left.values()),
                       "unexpected_errors": len(errors.records)})
        assert not lost, lost[:5]
        for failure, final, after in poisoned:
            assert failure is None and final["type"] == "error" and final["code"] == "SYNTHESIS_ERROR", final
            assert after is None, after  # the same session speaks again
        assert not any(left.values()) and not engine.blocks, left
        assert not errors.records, errors.records[:3]


@pytest.mark.timeout(60)
async def test_a_stuck_engine_turns_health_503(report):
    async with live(StuckEngine(), engine_stall_s=1.0) as (client, state, _):
        assert (await client.get("/health")).status == 200
        ws = await client.ws_connect("/api/v1/speak")
        await ws.send_json({"type": "start", "voice": VOICE})
        await ws.receive_json()
        await ws.send_json({"type": "speak", "text": "Nothing will ever come."})
        t0 = time.monotonic()
        while (r := await client.get("/health")).status == 200 and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.1)
        body = await r.json()
        report.update({"stall_limit_s": 1.0, "health_503_after_s": round(time.monotonic() - t0, 2)})
        assert r.status == 503 and body["status"] == "engine stalled", body
        await ws.close()
        await settle(state)
        assert (await client.get("/health")).status == 200  # nothing owed any more: healthy again


def _poison_admission(monkeypatch, engine) -> None:
    tokenizer = engine.model.tokenizer
    real = tokenizer.target_ids

    def target_ids(text: str):
        if POISON in text:
            raise RuntimeError("injected failure while admitting a request")
        return real(text)

    monkeypatch.setattr(tokenizer, "target_ids", target_ids)


def _poison_step(monkeypatch, engine) -> None:
    real = engine.runner.step

    def step(plan):
        if any(POISON in it.state.request.text for it in plan.decodes + plan.prefills):
            raise RuntimeError("injected failure in a step")
        return real(plan)

    monkeypatch.setattr(engine.runner, "step", step)


@pytest.mark.timeout(90)
async def test_real_engine_request_raising_at_admission_fails_alone(tiny_engine_shared, monkeypatch, report):
    await real_engine_isolation(tiny_engine_shared, monkeypatch, report, "admission")


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_real_engine_request_raising_in_a_step_fails_alone(tiny_engine_shared, monkeypatch, report):
    await real_engine_isolation(tiny_engine_shared, monkeypatch, report, "step")


async def real_engine_isolation(engine, monkeypatch, report, where: str) -> None:
    async with live(engine, expected_errors=("injected failure",), max_messages_per_s=0) as (client, state, _):
        async with aiohttp.ClientSession() as http:
            ref = await reference_audio(http, str(client.make_url("/api/v1/speak")), START, TEXTS)
        if where == "admission":
            _poison_admission(monkeypatch, engine)
        else:
            _poison_step(monkeypatch, engine)
        lost, poisoned = await isolation_run(client, ref, 8, 2, 20)
        left, _ = await settle(state, timeout=5)
        report.update({"engine": "real", "fault": where, "healthy_sessions": 8, "healthy_lost": len(lost),
                       "engine_thread_alive": engine._thread.is_alive(), "blocks_leaked": left["kv_blocks_used"]})
        assert not lost, lost[:3]
        assert engine._thread.is_alive()
        for failure, final, after in poisoned:
            assert failure is None and final["code"] == "SYNTHESIS_ERROR" and after is None, (failure, final, after)
        assert not any(left.values()), left
