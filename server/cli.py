"""The ``makima-tts`` command: one entry point, one subcommand per job.

Heavy imports (torch, the engine) happen inside each subcommand so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"


def _add_synthesize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthesize", help="synthesize speech with a cloned voice into a WAV file")
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or hub id (default: %(default)s)")
    p.add_argument("--text", help="text to speak")
    p.add_argument("--out", type=Path, help="output WAV (24 kHz mono float32)")
    p.add_argument("--requests", type=Path, help="JSONL of requests (id, text and the options below) to run "
                   "concurrently through the batching engine; writes into --out-dir")
    p.add_argument("--out-dir", type=Path, help="with --requests: DIR/<id>.wav, DIR/<id>.codes.npy, DIR/summary.json")
    p.add_argument("--stagger-ms", type=float, default=0.0, help="with --requests: arrival gap between requests")
    p.add_argument("--language", default="auto", help="language name (english, chinese, ...) or auto")
    p.add_argument("--ref-audio", type=Path, help="reference audio of the voice to clone (any rate/channels)")
    p.add_argument("--ref-text", help="transcript of --ref-audio (ICL cloning)")
    p.add_argument("--x-vector-only", action="store_true", help="clone from the speaker embedding only")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (deterministic)")
    p.add_argument("--seed", type=int, help="seed for sampling (reproducible runs)")
    p.add_argument("--temperature", type=float, help="sampling temperature (talker and code predictor)")
    p.add_argument("--top-k", type=int, help="top-k (talker and code predictor)")
    p.add_argument("--top-p", type=float, help="top-p (talker and code predictor)")
    p.add_argument("--repetition-penalty", type=float, help="repetition penalty on codebook 0")
    p.add_argument("--max-frames", type=int, help="frame cap (80 ms each); default derived from the text length")
    p.add_argument("--non-streaming-text", action="store_true", help="put the whole text in the prompt")
    p.add_argument("--codes-out", type=Path, help="write the generated codes (frames x 16) as .npy")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")


def _add_make_random_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-random-checkpoint", help="write a random checkpoint in the real layout")
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="tiny", choices=["tiny", "0.6b-base"])
    p.add_argument("--seed", type=int, default=0)


def _synthesize_requests(args: argparse.Namespace) -> int:
    from engine.batch_synthesize import run_requests
    from engine.config import EngineConfig
    from engine.engine import Engine

    if args.out_dir is None:
        raise ValueError("--requests needs --out-dir")
    if args.text or args.out:
        raise ValueError("--requests replaces --text/--out")
    if not args.requests.is_file():
        raise ValueError(f"--requests {args.requests}: no such file")
    engine = Engine.from_model(args.model, EngineConfig(device=args.device, dtype=args.dtype))
    try:
        report = run_requests(engine, args.requests, args.out_dir, args.stagger_ms)
    finally:
        engine.shutdown()
    for error in report["errors"]:
        print(f"makima-tts synthesize: {error}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "requests"}))
    return 0 if not report["errors"] else 1


def _synthesize(args: argparse.Namespace) -> int:
    import torch

    from engine.model import TTSModel
    from engine.synthesize import SynthesisRequest, run

    if args.requests is not None:
        return _synthesize_requests(args)
    if args.text is None or args.out is None:
        raise ValueError("--text and --out are required (or --requests with --out-dir)")
    if not args.text.strip():
        raise ValueError("--text is empty")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.ref_text and args.x_vector_only:
        raise ValueError("--ref-text and --x-vector-only exclude each other")
    req = SynthesisRequest(
        text=args.text, out=args.out, ref_audio=args.ref_audio, ref_text=args.ref_text,
        x_vector_only=args.x_vector_only, language=args.language, greedy=args.greedy, seed=args.seed,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, max_frames=args.max_frames,
        non_streaming_text=args.non_streaming_text, codes_out=args.codes_out)
    if args.ref_audio is not None and not args.ref_audio.is_file():
        raise ValueError(f"--ref-audio {args.ref_audio}: no such file")
    model = TTSModel.load(args.model, device=args.device, dtype=dtype)
    stats = run(model, req)
    print(json.dumps(stats))
    return 0


def _make_random_checkpoint(args: argparse.Namespace) -> int:
    from engine.random_checkpoint import make_random_checkpoint

    path = make_random_checkpoint(args.out, args.preset, args.seed)
    print(f"wrote a random {args.preset} checkpoint (its audio is noise) to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="makima-tts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synthesize(sub)
    _add_make_random_checkpoint(sub)
    args = parser.parse_args(argv)
    handlers = {"synthesize": _synthesize, "make-random-checkpoint": _make_random_checkpoint}
    try:
        return handlers[args.command](args)
    except (ValueError, RuntimeError, OSError) as e:  # our errors all derive from these
        print(f"makima-tts {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
