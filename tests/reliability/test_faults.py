"""Faults on the real engine (tiny random checkpoint, in this process): clients that vanish at
random points of a stream, clients that never read, and requests that raise inside the engine.
Throughout, control sessions keep speaking and must get complete, correct audio; afterwards no KV
block, engine request, slot or session may be left, and nothing may have logged an ERROR.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time

import aiohttp
import pytest

from tests.reliability import rawws
from tests.reliability.client import problem, reference_audio, run_session
from tests.reliability.inproc import VOICE, live, settle
from tests.server.conftest import recv_json

TEXTS = ["Hello there.", "Numbers one two three.", "A second, somewhat longer sentence to speak."]
START = {"type": "start", "voice": VOICE, "encoding": "pcm_s16le", "sampling": {"greedy": True}}
POINTS = ("before_start", "after_start", "after_ready", "after_speak", "mid_audio", "after_complete", "after_cancel",
          "after_stop")
SETTINGS = {"max_sessions": 4096, "max_messages_per_s": 0, "write_timeout_s": 2.0, "heartbeat_s": 2.0}


@pytest.fixture
def engine(tiny_engine_shared):
    return tiny_engine_shared


class Controls:
    """Sessions that keep speaking while faults happen; every utterance must be complete and correct."""

    def __init__(self, client, ref: dict[str, bytes], n: int = 4) -> None:
        self.client, self.ref, self.stop = client, ref, asyncio.Event()
        self.done, self.bad = 0, []
        self.tasks = [asyncio.ensure_future(self._loop(i)) for i in range(n)]

    async def _loop(self, i: int) -> None:
        url = str(self.client.make_url("/api/v1/speak"))
        async with aiohttp.ClientSession() as http:
            while not self.stop.is_set():
                texts = [TEXTS[(i + j) % len(TEXTS)] for j in range(2)]
                r = await run_session(http, url, START, texts, timeout=120)
                for u in r.utterances:
                    why = r.failure or problem(u, self.ref[u.text], tolerance=2)
                    if why:
                        self.bad.append(why)
                    else:
                        self.done += 1

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


def abort(ws: aiohttp.ClientWebSocketResponse) -> None:
    conn = ws._response.connection
    if conn is not None and conn.transport is not None:
        conn.transport.abort()  # vanish: no close frame, the TCP connection just ends


async def vanish(client, rng: random.Random, counts: collections.Counter) -> None:
    point, rude, k = rng.choice(POINTS), rng.random() < 0.5, rng.randint(1, 6)
    counts[point] += 1
    ws = await client.ws_connect("/api/v1/speak")
    try:
        if point == "before_start":
            return
        await ws.send_json(START)
        if point == "after_start":
            return
        await recv_json(ws, 60)
        if point == "after_ready":
            return
        await ws.send_json({"type": "speak", "id": 1, "text": rng.choice(TEXTS)})
        if point == "after_speak":
            return
        if point == "after_stop":
            await ws.send_json({"type": "stop"})
            return
        frames = 0
        while True:
            msg = await ws.receive(timeout=60)
            if msg.type == aiohttp.WSMsgType.BINARY:
                frames += 1
                if point == "after_cancel" and frames == 1:
                    await ws.send_json({"type": "cancel"})
                    return
                if point == "mid_audio" and frames >= k:
                    return
            elif msg.type == aiohttp.WSMsgType.TEXT:
                if msg.json()["type"] in ("complete", "error"):
                    return
            else:
                return
    finally:
        if rude:
            abort(ws)
        with contextlib.suppress(Exception):
            await ws.close()


async def disconnects(engine, report, n: int, concurrency: int) -> None:
    async with live(engine, **SETTINGS) as (client, state, errors):
        async with aiohttp.ClientSession() as http:
            ref = await reference_audio(http, str(client.make_url("/api/v1/speak")), START, TEXTS)
        controls = Controls(client, ref)
        rng, counts, sem = random.Random(7), collections.Counter(), asyncio.Semaphore(concurrency)
        t0 = time.monotonic()

        async def one() -> None:
            async with sem:
                await vanish(client, rng, counts)

        await asyncio.gather(*(one() for _ in range(n)))
        duration = time.monotonic() - t0
        await controls.finish()
        left, settle_s = await settle(state)
        report.update({"disconnects": n, "concurrency": concurrency, "duration_s": round(duration, 1),
                       "by_point": dict(sorted(counts.items())), "control_utterances": controls.done,
                       "control_lost": len(controls.bad), "blocks_leaked": left["kv_blocks_used"],
                       "left_over": sum(left.values()), "settle_s": round(settle_s, 2), "crashes": len(errors.records)})
        assert not controls.bad, controls.bad[:5]
        assert controls.done > 0
        assert not any(left.values()), left
        assert not errors.records, errors.records[:3]


@pytest.mark.timeout(120)
async def test_100_disconnects_at_random_points(engine, report):
    await disconnects(engine, report, 100, 25)


@pytest.mark.slow
@pytest.mark.timeout(290)
async def test_1000_disconnects_at_random_points(engine, report):
    await disconnects(engine, report, 1000, 50)


@pytest.mark.timeout(120)
async def test_readers_that_never_read_are_dropped_and_others_are_unaffected(engine, report):
    """Raw sockets with a 4 KiB receive buffer ask for long f32 utterances and never read: the write
    timeout or the unanswered heartbeat ends each, while control sessions keep getting their audio."""
    n = 8
    async with live(engine, **SETTINGS) as (client, state, errors):
        async with aiohttp.ClientSession() as http:
            ref = await reference_audio(http, str(client.make_url("/api/v1/speak")), START, TEXTS)
        socks = []
        for i in range(n):
            reader, writer, head = await rawws.connect(client.port, rcvbuf=4096)
            assert b" 101 " in head.split(b"\r\n")[0]
            writer.write(rawws.text(f'{{"type":"start","voice":"{VOICE}","encoding":"pcm_f32le","max_frames":400}}'))
            writer.write(rawws.text(f'{{"type":"speak","id":{i},"text":"{TEXTS[2] * 6}"}}'))
            await writer.drain()
            socks.append((reader, writer))
        while sum(1 for s in state.sessions if s.busy) < n:
            await asyncio.sleep(0.01)
        stuck, t0 = set(state.sessions), time.monotonic()
        controls = Controls(client, ref)
        while stuck & state.sessions and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.05)
        dropped_s = time.monotonic() - t0
        await asyncio.sleep(1.0)  # controls keep going a little after the drops
        await controls.finish()
        for _, writer in socks:
            writer.transport.abort()
        left, _ = await settle(state)
        gone = state.metrics.requests.labels("client_gone")._value.get()
        report.update({"never_readers": n, "all_dropped_after_s": round(dropped_s, 1),
                       "dropped_mid_utterance": int(gone), "control_utterances": controls.done,
                       "control_lost": len(controls.bad), "blocks_leaked": left["kv_blocks_used"],
                       "left_over": sum(left.values()), "crashes": len(errors.records)})
        assert not stuck & state.sessions, "a reader that never reads still holds its session"
        assert not controls.bad and controls.done > 0, controls.bad[:5]
        assert not any(left.values()), left
        assert not errors.records, errors.records[:3]
