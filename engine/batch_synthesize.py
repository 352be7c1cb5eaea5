"""``makima-tts synthesize --requests REQUESTS.jsonl``: many requests through the batching engine.

Each line is an object with ``id``, ``text`` and the single-request options (``language``,
``ref_audio``, ``ref_text``, ``x_vector_only``, ``non_streaming_text``, ``greedy``, ``seed``,
``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``max_frames``, ``priority``, and
for CustomVoice / VoiceDesign models ``speaker`` and ``instruct`` instead of a reference).
All requests run concurrently, arriving ``stagger_ms`` apart. A bad line is reported with its
number and skipped; the others still run.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.api import Finished, Priority, Request
from engine.audio import MAX_REFERENCE_SECONDS, AudioError, load_audio_24k, write_wav
from engine.engine import Engine
from engine.voice import VoicePrompt

FIELDS = {"id", "text", "language", "ref_audio", "ref_text", "x_vector_only", "non_streaming_text", "greedy", "seed",
          "temperature", "top_k", "top_p", "repetition_penalty", "max_frames", "priority", "speaker", "instruct"}
SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class LineError(ValueError):
    pass


@dataclass
class Line:
    number: int
    spec: dict


def parse_lines(text: str) -> tuple[list[Line], list[str]]:
    good, errors, seen = [], [], set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            spec = json.loads(raw)
            if not isinstance(spec, dict):
                raise LineError("not a JSON object")
            unknown = set(spec) - FIELDS
            if unknown:
                raise LineError(f"unknown field(s): {', '.join(sorted(unknown))}")
            rid = spec.get("id")
            if not isinstance(rid, str) or not SAFE_ID.match(rid) or rid.startswith("."):
                raise LineError("'id' must be 1-128 characters of letters, digits, '_', '-', '.'")
            if rid in seen:
                raise LineError(f"duplicate id {rid!r}")
            if not isinstance(spec.get("text"), str) or not spec["text"].strip():
                raise LineError("'text' must be a non-empty string")
            if spec.get("ref_audio") and not spec.get("x_vector_only") and not spec.get("ref_text"):
                raise LineError("ICL cloning needs 'ref_text' (or set 'x_vector_only': true)")
            if spec.get("priority", "normal") not in ("low", "normal", "high"):
                raise LineError("'priority' must be low, normal or high")
            seen.add(rid)
            good.append(Line(number, spec))
        except (json.JSONDecodeError, LineError) as e:
            errors.append(f"line {number}: {e}")
    return good, errors


async def _run_one(engine: Engine, request: Request, delay: float) -> tuple[list[np.ndarray], Finished]:
    await asyncio.sleep(delay)
    chunks: list[np.ndarray] = []
    async for item in engine.submit(request):
        if isinstance(item, Finished):
            return chunks, item
        chunks.append(item.samples)
    raise RuntimeError("stream ended without a Finished")  # the engine always sends one


def run_requests(engine: Engine, requests_file: Path, out_dir: Path, stagger_ms: float = 0.0) -> dict:
    lines, errors = parse_lines(requests_file.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    model = engine.model
    voices: dict[tuple, VoicePrompt] = {}
    requests: list[Request] = []
    summary: dict[str, dict] = {}
    for line in lines:
        s = line.spec
        key = None
        if s.get("ref_audio"):
            ref = Path(s["ref_audio"])
            ref = ref if ref.is_absolute() else requests_file.parent / ref  # relative to the requests file
            key = (ref, s.get("ref_text"), bool(s.get("x_vector_only")))
        try:
            if key is not None and key not in voices:
                audio = load_audio_24k(ref, max_seconds=MAX_REFERENCE_SECONDS)
                voices[key] = model.voice_prompt(audio, s.get("ref_text"), bool(s.get("x_vector_only")))
            sampling = model.sampling_from_options(bool(s.get("greedy")), s.get("seed"), s.get("temperature"),
                                                   s.get("top_k"), s.get("top_p"), s.get("repetition_penalty"))
        except (AudioError, ValueError, OSError) as e:
            errors.append(f"line {line.number}: {e}")
            continue
        requests.append(Request(text=s["text"], voice=voices.get(key), language=s.get("language", "auto"),
                                sampling=sampling, priority=Priority[s.get("priority", "normal").upper()],
                                max_frames=s.get("max_frames"), non_streaming_text=bool(s.get("non_streaming_text")),
                                request_id=s["id"], speaker=s.get("speaker"), instruct=s.get("instruct")))

    async def main() -> list:
        return await asyncio.gather(*(_run_one(engine, r, i * stagger_ms / 1000) for i, r in enumerate(requests)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    wall = time.perf_counter() - t0
    for request, (chunks, fin) in zip(requests, results, strict=True):
        rid = request.request_id
        if fin.error:
            errors.append(f"request {rid}: {fin.error_code}: {fin.error}")
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        write_wav(out_dir / f"{rid}.wav", audio, engine.sample_rate)
        np.save(out_dir / f"{rid}.codes.npy", fin.codes if fin.codes is not None else np.zeros((0, 16), np.int64))
        summary[rid] = {"frames": fin.frames, "audio_seconds": fin.audio_seconds, "ttfa_seconds": fin.ttfa_seconds,
                        "wall_seconds": fin.wall_seconds, "stop_reason": fin.stop_reason.value}
    report = {"requests": summary, "errors": errors, "wall_seconds": wall,
              "frames_per_second": sum(v["frames"] for v in summary.values()) / wall if wall else 0.0}
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2))
    return report
