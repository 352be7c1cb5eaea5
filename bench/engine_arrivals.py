"""``makima-tts bench engine`` under real traffic: arrivals instead of "every session starts together".

- closed loop: N sessions start staggered (``stagger_s`` apart); each speaks ``utterances`` utterances
  back to back, each with a frame cap drawn from a mix of lengths, so arrivals (prefills) keep landing
  between running streams as they would on a server;
- open loop: utterances arrive as a Poisson process at ``rate`` per second for ``duration_s`` seconds,
  whether or not earlier ones are done.

Each run reports what the engine counters say about it (engine steps, decode rows by path, prefill rows,
host synchronisations): the share of decode rows that took the static path is the point of the mode.
"""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np

from engine.api import Finished, Request
from engine.engine import Engine

TEXTS = [
    "Hello there.",
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Streaming speech should always stay ahead of real time for every listener.",
    "Numbers one two three.",
    "A new arrival must never stall the streams that are already running, however long its prompt.",
]
COUNTERS = ("engine_steps", "decode_rows{path=static}", "decode_rows{path=eager}", "prefill_rows", "host_syncs")


def frame_mix(frames: int) -> list[int]:
    """The utterance lengths a run draws from: half, once and twice the nominal frame count."""
    return [max(1, frames // 2), frames, 2 * frames]


async def _utterance(engine: Engine, voice, rng: random.Random, frames: int, tag: str) -> Finished:
    request = Request(text=rng.choice(TEXTS), voice=voice, max_frames=rng.choice(frame_mix(frames)),
                      sampling=engine.model.sampling(greedy=True), request_id=tag)
    async for item in engine.submit(request):
        if isinstance(item, Finished):
            return item
    raise RuntimeError("no Finished")


def _run(engine: Engine, main, mode: str, level: float) -> dict:
    before = dict(engine.stats().counters)
    t0 = time.perf_counter()
    results: list[Finished] = asyncio.run(main())
    wall = time.perf_counter() - t0
    after = engine.stats().counters
    counters = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
    decode_rows = counters["decode_rows{path=static}"] + counters["decode_rows{path=eager}"]
    ttfa = np.array([r.ttfa_seconds for r in results if r.ttfa_seconds is not None])
    frames = sum(r.frames for r in results)
    return {
        "mode": mode, "level": level, "utterances": len(results), "frames": frames, "wall_s": wall,
        "frames_per_s": frames / wall,
        "ttfa_s": {"p50": float(np.percentile(ttfa, 50)), "p95": float(np.percentile(ttfa, 95))} if ttfa.size else None,
        "errors": sum(1 for r in results if r.error_code), "counters": counters,
        "static_share": counters["decode_rows{path=static}"] / decode_rows if decode_rows else None,
        "host_syncs_per_step": counters["host_syncs"] / counters["engine_steps"] if counters["engine_steps"] else None,
    }


def closed_loop(engine: Engine, voice, sessions: int, utterances: int, frames: int, stagger_s: float,
                seed: int = 0) -> dict:
    async def session(i: int) -> list[Finished]:
        rng = random.Random(seed * 1000 + i)
        await asyncio.sleep(i * stagger_s)
        return [await _utterance(engine, voice, rng, frames, f"closed-{sessions}-{i}-{u}") for u in range(utterances)]

    async def main() -> list[Finished]:
        per_session = await asyncio.gather(*(session(i) for i in range(sessions)))
        return [r for rs in per_session for r in rs]

    return _run(engine, main, "closed", sessions)


def open_loop(engine: Engine, voice, rate: float, duration_s: float, frames: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration_s:
        arrivals.append(t)
        t += rng.expovariate(rate)

    async def one(i: int, at: float) -> Finished:
        await asyncio.sleep(at)
        return await _utterance(engine, voice, random.Random(seed * 1000 + i), frames, f"open-{rate}-{i}")

    async def main() -> list[Finished]:
        return list(await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals))))

    return _run(engine, main, "open", rate)
