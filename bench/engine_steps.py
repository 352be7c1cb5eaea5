"""``makima-tts bench engine``: the engine from inside, offline.

For each concurrency N, N requests with an x-vector voice start together and each generates a
fixed number of frames (greedy); reported: aggregate frames/s, time to first audio, and the step
split (prefill, talker decode, predictor, sampling, codec, scheduling), plus peak memory. The
voice prompt is made once beforehand, as a server does for a registered voice. The arrivals modes
(closed loop of staggered sessions, open-loop Poisson) are in bench/engine_arrivals.py; every run
reports the engine counters (decode rows by path, prefill rows, host synchronisations).
"""

from __future__ import annotations

import asyncio
import resource
import time

import numpy as np
import torch

from bench.engine_arrivals import COUNTERS, closed_loop, open_loop
from engine.api import Finished, Request
from engine.config import EngineConfig
from engine.engine import Engine

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank.",
    "Streaming speech should always stay ahead of real time for every listener.",
    "Many sessions share one device, and each one gets its frames on time.",
    "A new arrival must never stall the streams that are already running.",
]


async def _one(engine: Engine, request: Request) -> Finished:
    async for item in engine.submit(request):
        if isinstance(item, Finished):
            return item
    raise RuntimeError("no Finished")


def run_concurrency(engine: Engine, voice, n: int, frames: int) -> dict:
    before, counters_before = dict(engine.stats().extra), dict(engine.stats().counters)
    requests = [Request(text=TEXTS[i % len(TEXTS)], voice=voice, max_frames=frames,
                        sampling=engine.model.sampling(greedy=True), request_id=f"bench-{n}-{i}") for i in range(n)]

    async def main() -> list[Finished]:
        return await asyncio.gather(*(_one(engine, r) for r in requests))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    wall = time.perf_counter() - t0
    after, counters = engine.stats().extra, engine.stats().counters
    split = {k: after[k] - before.get(k, 0.0) for k in after if k.endswith("_s") or k == "steps"}
    total_frames = sum(r.frames for r in results)
    model_s = split["prefill_s"] + split["talker_s"] + split["predictor_s"] + split["sample_s"]
    busy = split["step_s"] + split["codec_s"] + split["schedule_s"]
    return {
        "sessions": n, "frames": total_frames, "wall_s": wall, "frames_per_s": total_frames / wall,
        "ttfa_s": {"min": min(r.ttfa_seconds for r in results), "max": max(r.ttfa_seconds for r in results)},
        "split_s": split,
        "decode_step_s": split["talker_s"] / max(split["steps"], 1),
        "scheduler_overhead": (busy - model_s - split["codec_s"]) / busy if busy else 0.0,
        "stop_reasons": sorted({r.stop_reason.value for r in results}),
        "counters": {k: counters.get(k, 0) - counters_before.get(k, 0) for k in COUNTERS},
    }


def measure(model: str, sessions: list[int], frames: int, device: str = "cpu", threads: int | None = 1,
            cuda_graphs: bool = True, closed: list[int] = (), rates: list[float] = (), utterances: int = 3,
            stagger_s: float = 0.05, duration_s: float = 10.0) -> dict:
    """The whole bench: one row per concurrency in ``sessions`` (all start together), then one per closed-loop
    session count in ``closed`` and per open-loop rate in ``rates`` (``makima-tts bench engine`` calls this)."""
    t0 = time.perf_counter()
    engine = Engine.from_model(model, EngineConfig(device=device, cpu_threads=threads, cuda_graphs=cuda_graphs,
                                                   max_running=max(64, *sessions, *closed)))
    startup_s = time.perf_counter() - t0
    try:
        ref = (0.1 * np.sin(np.arange(48000) * 2 * np.pi * 150 / 24000)).astype(np.float32)
        voice = asyncio.run(engine.make_voice(ref, None, True))
        run_concurrency(engine, voice, 1, 2)  # warm-up
        rows = [run_concurrency(engine, voice, n, frames) for n in sessions]
        arrivals = [closed_loop(engine, voice, n, utterances, frames, stagger_s) for n in closed]
        arrivals += [open_loop(engine, voice, rate, duration_s, frames) for rate in rates]
    finally:
        engine.shutdown()
    report = {"model": str(model), "device": device, "threads": torch.get_num_threads(),
              "cuda_graphs": engine.runner.decode.captured, "startup_s": startup_s,
              "frames_per_request": frames,
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "runs": rows,
              "arrivals": arrivals, "arrivals_setup": {"utterances_per_session": utterances, "stagger_s": stagger_s,
                                                       "duration_s": duration_s, "seed": 0}}
    if torch.cuda.is_available() and device == "cuda":
        report["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return report
