"""``makima-tts bench serve``: a WebSocket load generator for ``/api/v1/speak`` (docs/protocol.md).

Closed loop: a fixed number of sessions, each speaking one utterance after another. Open loop:
utterances arrive as a seeded Poisson process at a given rate, each on an idle session or a new one
(sessions are kept and reused, as a voice agent keeps its socket, so a voice prompt is made once per
session and not per utterance). Per utterance it records when every audio chunk arrived; a playback
clock that starts at the first byte turns that into what a listener hears: time to first audio,
underruns and stall time. The sessions and that clock are in bench/ws_client.py; aggregates and
tables in bench/report.py, plots in bench/plots.py.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from bench.texts import Text
from bench.ws_client import (
    SessionError,
    SessionPool,
    Target,
    Utterance,
    server_info,
    speak_url,
    synthetic_voice_wav,
)

LAG_TICK_S = 0.01
# (elapsed s, utterances done, in flight, errors) → draws the progress bar
ProgressFn = Callable[[float, int, int, int], None]


# ---- one load level ------------------------------------------------------------------------------
@dataclass
class Level:
    mode: str  # "concurrency" (closed loop) or "rate" (open loop, utterances per second)
    load: float
    duration_s: float
    utterances: list[Utterance] = field(default_factory=list)
    elapsed_s: float = 0.0  # from the level's start to its last utterance's end
    lag_s: list[float] = field(default_factory=list)  # this client's event-loop lag, sampled every 10 ms
    setup_s: list[float] = field(default_factory=list)
    clock0: float = 0.0  # perf_counter at the level's start: start_s + clock0 is the moment on this host's clock


def poisson_arrivals(rate: float, duration_s: float, seed: int) -> list[float]:
    """Arrival times in [0, duration_s): exponential gaps at ``rate`` per second, reproducible by seed."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(t)


async def _measure_lag(into: list[float]) -> None:
    # A client that cannot keep up stamps arrivals late and inflates every number; this says when.
    while True:
        t = time.perf_counter()
        await asyncio.sleep(LAG_TICK_S)
        into.append(time.perf_counter() - t - LAG_TICK_S)


class _Runner:
    def __init__(self, pool: SessionPool, level: Level, texts: list[Text], timeout_s: float) -> None:
        self.pool, self.level, self.texts, self.timeout_s = pool, level, texts, timeout_s
        self.clock0 = time.perf_counter()
        self.in_flight = 0

    async def one(self, k: int) -> None:
        text = self.texts[k % len(self.texts)]
        self.in_flight += 1
        try:
            try:
                session = await self.pool.acquire()
            except SessionError as e:
                self.level.utterances.append(Utterance(text.id, len(text.text), -1,
                                                       time.perf_counter() - self.clock0, error=e.code))
                await asyncio.sleep(0.2)  # a refusing server must not turn a closed loop into a busy loop
                return
            t = self.pool.target
            u = await session.speak(text, self.clock0, self.timeout_s, t.text_input, t.word_interval_s)
            self.pool.release(session)
            self.level.utterances.append(u)
        finally:
            self.in_flight -= 1

    async def closed_loop(self, sessions: int) -> None:
        deadline = self.clock0 + self.level.duration_s

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                await self.one(k)
                k += sessions

        await asyncio.gather(*(worker(i) for i in range(sessions)))

    async def open_loop(self, rate: float, seed: int) -> None:
        tasks = []
        for k, at in enumerate(poisson_arrivals(rate, self.level.duration_s, seed)):
            await asyncio.sleep(max(0.0, self.clock0 + at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(self.one(k)))
        await asyncio.gather(*tasks)


async def run_level(target: Target, mode: str, load: float, texts: list[Text], duration_s: float, seed: int,
                    progress: ProgressFn | None = None) -> Level:
    level = Level(mode, load, duration_s)
    async with aiohttp.ClientSession() as http:
        pool = SessionPool(http, target)
        await pool.preopen(int(load) if mode == "concurrency" else min(64, math.ceil(load)))
        runner = _Runner(pool, level, texts, target.timeout_s)
        background = [asyncio.ensure_future(_measure_lag(level.lag_s))]
        if progress is not None:
            async def tick() -> None:
                while True:
                    done = len(level.utterances)
                    progress(time.perf_counter() - runner.clock0, done, runner.in_flight,
                             sum(u.error is not None for u in level.utterances))
                    await asyncio.sleep(0.2)
            background.append(asyncio.ensure_future(tick()))
        try:
            if mode == "concurrency":
                await runner.closed_loop(int(load))
            else:
                await runner.open_loop(load, seed)
        finally:
            for task in background:
                task.cancel()
            await pool.close()
    ends = [u.start_s + (u.end_s or (u.chunks[-1][0] if u.chunks else 0.0)) for u in level.utterances]
    level.elapsed_s = max(ends, default=0.0)
    level.setup_s, level.clock0 = pool.setup_s, runner.clock0
    level.utterances.sort(key=lambda u: u.start_s)
    return level


# ---- a whole run ----------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    url: str
    mode: str
    loads: list[float]
    duration_s: float
    texts: list[Text]
    voice: str | None = None
    language: str = "auto"
    token: str | None = None
    seed: int = 0
    timeout_s: float = 60.0
    max_frames: int | None = None
    warmup: int = 1
    ready_timeout_s: float = 120.0
    text_input: str = "speak"  # speak | live | sentences (bench/ws_client.py Target)
    word_interval_s: float = 0.05


def start_message(cfg: ServeConfig, info: dict) -> tuple[dict, str]:
    """The start message, and how the voice was chosen (for the report)."""
    start: dict = {"type": "start", "encoding": "pcm_s16le", "language": cfg.language, "sampling": {"seed": cfg.seed}}
    if cfg.max_frames is not None:
        start["max_frames"] = cfg.max_frames
    if cfg.voice:
        start["voice"] = cfg.voice
        return start, cfg.voice
    if info.get("default_voice"):
        return start, f"server default ({info['default_voice']})"
    start["voice"] = {"ref_audio": base64.b64encode(synthetic_voice_wav()).decode(), "x_vector_only": True}
    return start, "inline x-vector (built-in synthetic 3 s clip)"


async def warm_up(target: Target, texts: list[Text]) -> None:
    async with aiohttp.ClientSession() as http:
        pool = SessionPool(http, target)
        try:
            session = await pool.acquire()
            for text in texts:
                u = await session.speak(text, time.perf_counter(), target.timeout_s, target.text_input,
                                        target.word_interval_s)
                if u.error:
                    raise RuntimeError(f"warm-up utterance {text.id} failed at {target.url}: {u.error}")
        except SessionError as e:
            raise RuntimeError(f"cannot open a session at {target.url}: {e}") from e
        finally:
            await pool.close()


async def run_serve(cfg: ServeConfig, progress: Callable[[Level], ProgressFn] | None = None,
                    done: Callable[[Level], None] | None = None) -> tuple[dict, list[Level]]:
    """Every level in ``cfg.loads``, one after another; returns the server's info and the levels."""
    url = speak_url(cfg.url)
    headers = {"Authorization": f"Bearer {cfg.token}"} if cfg.token else {}
    info = await server_info(url, headers, cfg.ready_timeout_s)
    start, voice = start_message(cfg, info)
    info = {**info, "voice_used": voice, "speak_url": url}
    target = Target(url, start, headers, cfg.timeout_s, cfg.text_input, cfg.word_interval_s)
    texts = list(cfg.texts)
    random.Random(cfg.seed).shuffle(texts)  # a mix from the first utterance on, the same mix every run
    if cfg.warmup:  # first-call costs (voice prompt, lazy initialisation) are not load
        await warm_up(target, texts[:cfg.warmup])
    levels = []
    for load in cfg.loads:
        level = Level(cfg.mode, load, cfg.duration_s)
        fn = progress(level) if progress is not None else None
        level = await run_level(target, cfg.mode, load, texts, cfg.duration_s, cfg.seed, fn)
        if done is not None:
            done(level)
        levels.append(level)
    return info, levels
