"""Ours vs the official qwen-tts on the same checkpoint and text, greedy, in one run.

The official code runs in its own venv (tests/fixtures/oracle/setup-oracle-venv.sh) as a subprocess;
both sides synthesise the same text with an x-vector voice at two frame caps, and the per-frame
time is the difference over the frame difference (prefill and start-up cancel). The memory-bandwidth
floor of a frame is measured on the same machine in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.floor import floor_seconds_per_frame
from engine.generate import generate_codes
from engine.model import TTSModel
from engine.prompt import build_prompt

BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1}  # int8's per-channel scales are 0.1-0.4 % more
OFFICIAL_RUNNER = Path(__file__).resolve().parent / "official" / "run_official.py"
DEFAULT_ORACLE_PYTHON = "../.oracle-venv/bin/python"  # relative to the checkout, as the setup script puts it
DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."


def ours(model_dir: str, text: str, frames: tuple[int, int], weights: str = "auto") -> dict:
    t0 = time.perf_counter()
    model = TTSModel.load(model_dir, weights=weights)
    load_s = time.perf_counter() - t0
    ref = (0.1 * np.sin(np.arange(48000) * 2 * np.pi * 150 / 24000)).astype(np.float32)
    voice = model.voice_prompt(ref, x_vector_only=True)
    text_ids = model.tokenizer.target_ids(text)
    runs = {}
    for n in frames:
        t0 = time.perf_counter()
        prompt = build_prompt(model.tts.talker, model.cfg, model.tokenizer.role_ids(), text_ids, voice, "auto")
        result = generate_codes(model.tts.talker, prompt, model.sampling(greedy=True), n)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.decode(result.codes)
        runs[n] = {"frames": int(result.codes.shape[0]), "generate_s": gen_s, "decode_s": time.perf_counter() - t0,
                   "talker_s": result.talker_seconds, "predictor_s": result.predictor_seconds,
                   "prefill_s": result.prefill_seconds}
    a, b = (runs[n] for n in frames)
    return {"load_s": load_s, "runs": runs,
            "s_per_frame": (b["generate_s"] - a["generate_s"]) / (b["frames"] - a["frames"]),
            "decode_s_per_frame": b["decode_s"] / b["frames"], "threads": torch.get_num_threads(),
            "precision": model.weight_plan.as_dict(), "config": model.cfg}


def official(python: str, model_dir: str, text: str, frames: tuple[int, int], threads: int = 0) -> dict:
    cmd = [python, str(OFFICIAL_RUNNER), "--checkpoint", model_dir, "--text", text, "--frames", *map(str, frames)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                                                                              "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(model: str, oracle_python: str | None, text: str = DEFAULT_TEXT, frames: tuple[int, int] = (2, 12),
            threads: int = 0, weights: str = "auto") -> dict:
    """Both sides and the floor (``makima-tts bench compare-official`` calls this); no official side
    when ``oracle_python`` is empty. ``threads``: torch threads on both sides (0: torch's default).
    ``weights``: our projections' weight format; the floor counts that format's bytes."""
    if threads:
        torch.set_num_threads(threads)
    mine = ours(model, text, frames, weights)
    cfg = mine.pop("config")
    floor = floor_seconds_per_frame(cfg, bytes_per_weight=BYTES_PER_WEIGHT[mine["precision"]["weights"]])
    theirs = official(oracle_python, model, text, frames, threads) if oracle_python else None
    report = {"ours": mine, "official": theirs, "floor": floor,
              "ours_vs_floor": mine["s_per_frame"] / floor["floor_s_per_frame"]}
    if theirs:
        report["official_vs_ours"] = theirs["s_per_frame"] / mine["s_per_frame"]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--oracle-python", default=DEFAULT_ORACLE_PYTHON)
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--frames", type=int, nargs=2, default=[2, 12])
    args = ap.parse_args()
    report = compare(args.model, args.oracle_python, args.text, tuple(args.frames))
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
