"""The codec stage alone: ``CodecStream`` driven from outside as the engine drives it.

N x-vector streams with staggered starts (stream i opens at step i mod 12, so that chunk phases differ
as under real traffic), one random frame per stream per step, one ``collect`` per step, each stream
closed after its last frame. Reported per N: codec time per generated frame, decoder calls per step
that decoded anything, and the codec's peak working memory (peak RSS during the run minus RSS before
it; torch's CPU allocations are invisible to tracemalloc; on CUDA also the allocator's peak) and the
lockstep pool's state bytes per stream. Each N runs in its own process so that the
peak of one does not hide the next.

    python3 -m bench.codec --model /work/ckpt/full --sessions 1,8,32,64
    python3 -m bench.codec --model /work/ckpt/full --codec-module /work/main/engine/codec_stream.py  # before

``--codec-module`` loads ``CodecStream`` from another file (e.g. the landed tree), so one bench
measures before and after on the same weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STAGGER = 12  # steps over which stream starts are spread
SAMPLES_PER_FRAME = 1920


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _codec_stream_class(module_path: str | None):
    if module_path is None:
        from engine.codec_stream import CodecStream
        return CodecStream
    spec = importlib.util.spec_from_file_location("codec_stream_under_test", module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module.CodecStream


def _make_stream(cls, tokenizer, schedule: tuple[int, ...], capacity: int):
    try:  # the lockstep stream takes its pool size up front; the landed one grows on demand
        return cls(tokenizer, schedule, SAMPLES_PER_FRAME, deadline_flush=False, capacity=capacity)
    except TypeError:
        return cls(tokenizer, schedule, SAMPLES_PER_FRAME, deadline_flush=False)


def run_one(model: str, sessions: int, frames: int, module_path: str | None, threads: int,
            schedule: tuple[int, ...], capacity: int, device: str) -> dict:
    import torch

    from engine.checkpoint import build_on_meta, load_strict, resolve_model
    from engine.config import ModelConfig
    from engine.models.speech_tokenizer import SpeechTokenizer

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    path = resolve_model(model)
    cfg = ModelConfig.from_dir(path)
    tok = load_strict(build_on_meta(lambda: SpeechTokenizer(cfg.speech_tokenizer)),
                      path / "speech_tokenizer" / "model.safetensors", device, torch.float32)
    cuda = tok.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.allow_tf32 = False  # as TTSModel.load: the codec runs in exact fp32
    calls = [0]
    tok.decoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    cls = _codec_stream_class(module_path)
    for t in tok.state_dict().values():  # page the weights in now: they are not the codec's working memory
        t.sum()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    # The baseline is the reset high-water mark itself, not VmRSS read beside it: RSS can fall between
    # two reads (freed pages), which made the "peak above baseline" negative; VmHWM only grows from here.
    rss_before = _rss_kib("VmHWM")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    cs = _make_stream(cls, tok, schedule, capacity)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.speech_tokenizer.decoder.codebook_size, (sessions, frames, 16), generator=gen)
    starts = [i % STAGGER for i in range(sessions)]
    samples, busy_steps, elapsed = 0, 0, 0.0
    calls[0] = 0
    for step in range(max(starts) + frames):
        finals = set()
        t0 = time.perf_counter()
        for i, start in enumerate(starts):
            k = step - start
            if k == 0:
                cs.open(f"s{i}", None)
            if 0 <= k < frames:
                cs.push(f"s{i}", codes[i, k].tolist())
                if k == frames - 1:
                    finals.add(f"s{i}")
        before = calls[0]
        chunks = cs.collect(finals)
        if cuda:
            torch.cuda.synchronize()
        for rid in finals:
            cs.close(rid)
        elapsed += time.perf_counter() - t0
        busy_steps += calls[0] > before
        samples += sum(c.samples.size for c in chunks)
    total = sessions * frames
    if samples != total * SAMPLES_PER_FRAME:
        raise RuntimeError(f"got {samples} samples for {total} frames")
    return {"sessions": sessions, "frames": total, "codec_s": elapsed, "ms_per_frame": 1e3 * elapsed / total,
            "decoder_calls": calls[0], "calls_per_busy_step": calls[0] / max(busy_steps, 1),
            "peak_working_mib": (_rss_kib("VmHWM") - rss_before) / 1024,
            "peak_cuda_mib": (torch.cuda.max_memory_allocated() - cuda_before) / 2**20 if cuda else None,
            "state_mib_per_stream": (cs.decoder.pool.bytes_per_stream / 2**20
                                     if hasattr(cs.decoder.pool, "bytes_per_stream") else None)}


def _mib(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (only its speech_tokenizer/ is loaded)")
    p.add_argument("--sessions", default="1,8,32,64", help="concurrent streams, comma-separated")
    p.add_argument("--frames", type=int, default=24, help="frames per stream (default: %(default)s)")
    p.add_argument("--codec-module", help="a codec_stream.py to load CodecStream from (default: this tree's)")
    p.add_argument("--schedule", default="1,2,4,8,12",
                   help="chunk schedule in frames (default: the engine's); 1 makes the landed stream decode "
                        "one frame per call")
    p.add_argument("--capacity", type=int, default=64,
                   help="streams the lockstep pool holds (default: the engine's max_running, %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as the engine)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one N in this process
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.model, args.one, args.frames, args.codec_module, args.threads,
                                  tuple(int(v) for v in args.schedule.split(",")), max(args.capacity, args.one),
                                  args.device)))
        return
    print(f"load: {os.getloadavg()[0]:.2f}  module: {args.codec_module or 'engine/codec_stream.py'}  "
          f"schedule: {args.schedule}  frames per stream: {args.frames}")
    print("| streams | frames | ms / frame | decoder calls / busy step | peak working MiB (RSS) | peak CUDA MiB "
          "| state MiB / stream |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(v) for v in args.sessions.split(",")):
        cmd = [sys.executable, "-m", "bench.codec", "--model", args.model, "--frames", str(args.frames),
               "--threads", str(args.threads), "--schedule", args.schedule, "--capacity", str(args.capacity),
               "--device", args.device, "--one", str(n)]
        if args.codec_module:
            cmd += ["--codec-module", args.codec_module]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"| {n} | {r['frames']} | {r['ms_per_frame']:.2f} | {r['calls_per_busy_step']:.2f} "
              f"| {r['peak_working_mib']:.0f} | {_mib(r['peak_cuda_mib'])} | {_mib(r['state_mib_per_stream'], 2)} |",
              flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
