"""vox-tts (PyPI ``vox-tts``, C++) on a Qwen3-TTS checkpoint: seconds per frame and frames/s under sessions.

Runs in vox's own venv (bench/peers/run_peers.sh makes it), never imports makima-tts. Same protocol
as ``makima-tts bench compare-official``: an x-vector voice from a 2 s 150 Hz sine, greedy (top-k 1
for both codebook levels), the same pangram at two frame caps; per-frame time = difference / frame
difference, end to end including the codec. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import vox

TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank."
SAMPLES_PER_FRAME = 1920
GREEDY = {"top_k": 1, "sub_top_k": 1, "seed": 0}


def build(checkpoint: str, dtype: str, quant: str, out: Path) -> Path:
    if not out.exists():
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "vox", "build", "--model", checkpoint, "--dtype", dtype, "-o", str(out)]
        subprocess.run(cmd + (["--quant", quant] if quant else []), check=True)
    return out


def timed(engine: vox.Engine, voice: vox.Voice, frames: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    audio = engine.synthesize(TEXT, voice, max_frames=frames, **GREEDY)
    return time.perf_counter() - t0, len(audio) // SAMPLES_PER_FRAME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--quant", default="", choices=["", "q8"])
    ap.add_argument("--tmod", type=Path, required=True, help="converted model file (built when missing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, nargs=2, default=[3, 11])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sessions", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    ap.add_argument("--session-frames", type=int, default=16)
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = vox.Engine(str(build(args.checkpoint, args.dtype, args.quant, args.tmod)), device="cpu",
                        threads=args.threads)
    load_s = time.perf_counter() - t0
    ref = (0.1 * np.sin(np.arange(48000) * 2 * np.pi * 150 / 24000)).astype(np.float32)
    voice = engine.clone_voice((ref, 24000), xvector_only=True)
    timed(engine, voice, 2)  # warm-up
    per_frame = []
    for _ in range(args.repeats):
        (ta, fa), (tb, fb) = (timed(engine, voice, n) for n in args.frames)
        per_frame.append((tb - ta) / max(fb - fa, 1))
    runs = []
    for n in args.sessions:
        t0 = time.perf_counter()
        audios = engine.synthesize_many([TEXT] * n, voice, workers=n, max_frames=args.session_frames, **GREEDY)
        wall = time.perf_counter() - t0
        frames = sum(len(a) // SAMPLES_PER_FRAME for a in audios)
        runs.append({"sessions": n, "frames": frames, "wall_s": wall, "frames_per_s": frames / wall})
    print(json.dumps({"engine": f"vox-tts {vox.__version__}", "precision": args.quant or args.dtype,
                      "threads": args.threads, "load_s": load_s, "s_per_frame_runs": per_frame,
                      "s_per_frame": statistics.median(per_frame), "sessions": runs}))


if __name__ == "__main__":
    main()
