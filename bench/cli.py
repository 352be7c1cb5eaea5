"""``makima-tts bench {serve,engine,compare-official}``: the benches behind one command.

server/cli.py calls ``add_bench_parser(sub)`` and dispatches ``bench`` to ``run_bench(args)``; run
standalone as ``python -m bench.cli ...``. Every bench writes ``--out DIR/<name>.json`` and
``<name>.md`` (serve also PNG plots) and prints the Markdown. Heavy imports (torch, the engine,
matplotlib) happen inside the handlers so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from server.cli import WEIGHT_CHOICES, WEIGHTS_HELP  # argparse strings only: no torch

ROOT = Path(__file__).resolve().parents[1]


def _floats(value: str) -> list[float]:
    try:
        loads = [float(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {value!r}") from e
    if not loads or any(v <= 0 for v in loads):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {value!r}")
    return loads


def _ints(value: str) -> list[int]:
    loads = _floats(value)
    if any(v != int(v) for v in loads):
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {value!r}")
    return [int(v) for v in loads]


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="load a running server's /api/v1/speak and measure TTFA, underruns, throughput",
                       description="Closed loop (--concurrency: that many sessions, each speaking back to back) or "
                                   "open loop (--rate: Poisson arrivals, seeded). Without --voice and without a "
                                   "server default voice, sessions clone a built-in synthetic clip (x-vector).")
    p.add_argument("--url", required=True, help="ws://HOST:PORT (the path defaults to /api/v1/speak)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_floats, help="closed loop: sessions per level, e.g. 1,4,16,32 "
                                                          "(default when --rate is not given: 1,4,16,32)")
    load.add_argument("--rate", type=_floats, help="open loop: utterances per second per level, e.g. 1,5,10")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per level (default: %(default)s)")
    p.add_argument("--texts", default="medium", help="built-in set(s) (en-short ... zh-long, short, medium, long, en, "
                   "zh, all; comma-separated) or a file with one utterance a line (default: %(default)s)")
    p.add_argument("--voice", help="a voice registered on the server (default: the server's default voice, else an "
                                   "inline synthetic x-vector voice)")
    p.add_argument("--language", default="auto", help="session language (default: %(default)s)")
    p.add_argument("--max-frames", type=int, help="frame cap per utterance (80 ms each), sent in start")
    p.add_argument("--text-input", choices=("speak", "live", "sentences"), default="speak",
                   help="speak: each text whole; live: one live utterance fed word by word; sentences: words by "
                        "append (the server speaks each sentence), then flush (default: %(default)s)")
    p.add_argument("--word-interval-ms", type=float, default=50.0,
                   help="live/sentences: time between words, an LLM's token rate (default: %(default)s)")
    p.add_argument("--slo-ttfa-ms", type=float, default=200.0, help="target time to first audio (default: %(default)s)")
    p.add_argument("--slo-underruns", type=int, default=0, help="underruns allowed per utterance (default: 0)")
    p.add_argument("--slo-share", type=float, default=0.95,
                   help="capacity = the highest load with this share of utterances on target (default: %(default)s)")
    p.add_argument("--preroll-ms", type=float, default=0.0,
                   help="client jitter buffer: playback starts this long after the first byte (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="arrivals, text order and sampling seed (default: 0)")
    p.add_argument("--timeout", type=float, default=60.0, help="per utterance, seconds (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed utterances before the first level (default: 1)")
    p.add_argument("--ready-timeout", type=float, default=120.0,
                   help="wait this long for the server's /ready (default: %(default)s)")
    p.add_argument("--token-file", type=Path, help="file whose first line is the bearer token (or MAKIMA_TOKEN)")
    p.add_argument("--note", help=NOTE_HELP)
    p.add_argument("--out", type=Path, required=True, help="directory for serve-<mode>.json/.md/-ttfa.png/"
                                                           "-throughput.png")


# A tiny model's ops are so short that torch's worker threads spend their time waiting at barriers;
# when another process holds a core, that wait multiplies per-frame times several-fold, run to run.
NOTE_HELP = "a line for the report's header: what the command cannot see (how the server was started, ...)"
THREADS_HELP = "torch CPU threads (default 1, as the engine; 0: torch's choice)"


def _add_engine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engine", help="the engine offline: per-step split, frames/s against batch size, peak memory")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--sessions", type=_ints, help="concurrencies that start together (default: 1,2,4,8, or none "
                   "when an arrivals mode is given)")
    p.add_argument("--closed-loop", type=_ints, default=[], metavar="N,...",
                   help="arrivals mode: N staggered sessions, each speaking --utterances utterances of mixed length")
    p.add_argument("--rate", type=_floats, default=[], metavar="R,...",
                   help="arrivals mode: open-loop Poisson arrivals, R utterances per second for --duration seconds")
    p.add_argument("--utterances", type=int, default=3, help="closed loop: utterances per session (default: 3)")
    p.add_argument("--stagger-ms", type=float, default=50.0, help="closed loop: start offset between sessions "
                   "(default: %(default)s)")
    p.add_argument("--duration", type=float, default=10.0, help="open loop: seconds of arrivals (default: %(default)s)")
    p.add_argument("--frames", type=int, default=16, help="frames each session generates (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-cuda-graphs", action="store_true", help="on CUDA, run every step eagerly (to compare)")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help=WEIGHTS_HELP)
    p.add_argument("--note", help=NOTE_HELP)
    p.add_argument("--out", type=Path, required=True, help="directory for engine.json and engine.md")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare-official", help="ours vs the official qwen-tts: per-frame time on one checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--oracle-python", default=os.environ.get("MAKIMA_ORACLE_PYTHON",
                                                             str(ROOT.parent / ".oracle-venv" / "bin" / "python")),
                   help="python of a venv with qwen-tts (default: %(default)s)")
    p.add_argument("--no-official", action="store_true", help="ours and the bandwidth floor only")
    p.add_argument("--text", help="text to speak (default: a pangram)")
    p.add_argument("--frames", type=int, nargs=2, default=[2, 12], help="two frame caps (default: 2 12)")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto", help=WEIGHTS_HELP)
    p.add_argument("--note", help=NOTE_HELP)
    p.add_argument("--out", type=Path, required=True, help="directory for compare-official.json and .md")


DESCRIPTION = ("Benchmarks: a server under load (serve), the engine offline (engine), ours against the official "
               "code (compare-official). Each writes --out DIR/<name>.json and .md and prints the Markdown.")


def add_bench_parser(subparsers: argparse._SubParsersAction, prog: str | None = None) -> argparse.ArgumentParser:
    extra = {"prog": prog} if prog else {}  # standalone, the usage line should not say "bench" twice
    p = subparsers.add_parser("bench", help="measure: a server under load, the engine offline, ours vs official",
                              description=DESCRIPTION, **extra)
    sub = p.add_subparsers(dest="bench_command", required=True)
    _add_serve(sub)
    _add_engine(sub)
    _add_compare(sub)
    r = sub.add_parser("render", help="rewrite a report's Markdown (and plots) from its JSON, after a change to "
                                      "the report code or to set --note")
    r.add_argument("json", type=Path, help="a .json written by bench serve, engine or compare-official")
    r.add_argument("--note", help="replace the header's note")
    return p


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is not None:
        lines = [ln.strip() for ln in args.token_file.read_text().splitlines()]
        tokens = [ln for ln in lines if ln and not ln.startswith("#")]
        if not tokens:
            raise ValueError(f"--token-file {args.token_file}: no token in it")
        return tokens[0]
    return os.environ.get("MAKIMA_TOKEN") or None


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    from dataclasses import asdict

    from bench.plots import plot_serve
    from bench.report import Progress, Slo, capacity, provenance, serve_markdown, summarise, write_report
    from bench.serve_load import Level, ServeConfig, run_serve
    from bench.texts import load_texts

    mode, loads = ("rate", args.rate) if args.rate else ("concurrency", args.concurrency or [1, 4, 16, 32])
    if mode == "concurrency" and any(n != int(n) for n in loads):
        raise ValueError("--concurrency: whole numbers of sessions")
    if args.duration <= 0:
        raise ValueError("--duration must be positive")
    slo = Slo(args.slo_ttfa_ms, args.slo_underruns, args.slo_share)
    cfg = ServeConfig(url=args.url, mode=mode, loads=loads, duration_s=args.duration, texts=load_texts(args.texts),
                      voice=args.voice, language=args.language, token=_token(args), seed=args.seed,
                      timeout_s=args.timeout, max_frames=args.max_frames, warmup=args.warmup,
                      ready_timeout_s=args.ready_timeout, text_input=args.text_input,
                      word_interval_s=args.word_interval_ms / 1000)
    label = "c" if mode == "concurrency" else "rate"
    bar: list[Progress] = []
    levels: list[dict] = []

    def progress(level: Level) -> Progress:
        bar[:] = [Progress(f"[{loads.index(level.load) + 1}/{len(loads)}] {label}={level.load:g}", level.duration_s)]
        return bar[0]

    def done(level: Level) -> None:
        bar[0].close()
        records = [u.record(args.preroll_ms / 1000) for u in level.utterances]
        s = summarise(records, mode, level.load, level.duration_s, level.elapsed_s, level.lag_s, level.setup_s, slo)
        t = s["ttfa_ms"] or {}
        print(f"{label}={level.load:g}: {s['utterances']} utterances, {sum(s['errors'].values())} errors, TTFA p50 "
              f"{t.get('p50', float('nan')):.0f} ms p95 {t.get('p95', float('nan')):.0f} ms, "
              f"{s['underrun_utterances']} with underruns, {s['audio_s_per_s'] or 0:.2f} audio s/s", file=sys.stderr)
        levels.append({**s, "records": records})

    server, _ = asyncio.run(run_serve(cfg, progress, done))
    report = {"bench": "serve", "mode": mode, "provenance": provenance(args.note), "server": server, "slo": asdict(slo),
              "config": {"url": args.url, "loads": loads, "duration_s": args.duration, "texts": args.texts,
                         "text_count": len(cfg.texts), "language": args.language, "voice": args.voice,
                         "seed": args.seed, "preroll_ms": args.preroll_ms, "timeout_s": args.timeout,
                         "max_frames": args.max_frames, "warmup": args.warmup, "text_input": args.text_input,
                         "word_interval_ms": args.word_interval_ms},
              "capacity": capacity(levels, slo), "levels": levels}
    stem = f"serve-{mode}"
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot_serve(report, args.out, stem)
    markdown = serve_markdown(report, plots)
    paths = write_report(args.out, stem, report, markdown, compact=True)
    print(markdown)
    print(f"\nwrote {', '.join(str(p) for p in paths + [args.out / n for n in plots])}", file=sys.stderr)
    return 0 if any(s["ok"] for s in levels) else 1


def _engine(args: argparse.Namespace) -> int:
    from bench import engine_steps
    from bench.report import engine_markdown, provenance, write_report

    sessions = args.sessions if args.sessions is not None else ([] if args.closed_loop or args.rate else [1, 2, 4, 8])
    report = engine_steps.measure(args.model, sessions, args.frames, args.device, args.threads,
                                  cuda_graphs=not args.no_cuda_graphs, closed=args.closed_loop, rates=args.rate,
                                  utterances=args.utterances, stagger_s=args.stagger_ms / 1000,
                                  duration_s=args.duration, weights=args.weights)
    report.update(bench="engine", provenance=provenance(args.note))
    markdown = engine_markdown(report)
    paths = write_report(args.out, "engine", report, markdown)
    print(markdown)
    print(f"\nwrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from bench import compare_official
    from bench.report import compare_markdown, provenance, write_report

    oracle = None if args.no_official else args.oracle_python
    if oracle is not None and not Path(oracle).exists():
        raise ValueError(f"--oracle-python {oracle}: not found (make the venv with "
                         "tests/fixtures/oracle/setup-oracle-venv.sh, pass its python, or use --no-official)")
    text = args.text or compare_official.DEFAULT_TEXT
    report = compare_official.compare(args.model, oracle, text, tuple(args.frames), args.threads, args.weights)
    report.update(bench="compare-official", model=str(args.model), text=text, frames=list(args.frames),
                  provenance=provenance(args.note))
    markdown = compare_markdown(report)
    paths = write_report(args.out, "compare-official", report, markdown)
    print(markdown)
    print(f"\nwrote {', '.join(map(str, paths))}", file=sys.stderr)
    return 0


def _render(args: argparse.Namespace) -> int:
    import json

    from bench.plots import plot_serve
    from bench.report import Slo, capacity, compare_markdown, engine_markdown, serve_markdown, write_report

    report = json.loads(args.json.read_text())
    kind = report.get("bench")
    if kind not in ("serve", "engine", "compare-official"):
        raise ValueError(f"{args.json}: not a report written by bench serve, engine or compare-official")
    if args.note is not None:
        report["provenance"]["note"] = args.note
    stem = args.json.stem
    if kind == "serve":
        report["capacity"] = capacity(report["levels"], Slo(**report["slo"]))
        markdown = serve_markdown(report, plot_serve(report, args.json.parent, stem))
    else:
        markdown = (engine_markdown if kind == "engine" else compare_markdown)(report)
    write_report(args.json.parent, stem, report, markdown, compact=kind == "serve")
    print(markdown)
    return 0


def run_bench(args: argparse.Namespace) -> int:
    handlers = {"serve": _serve, "engine": _engine, "compare-official": _compare, "render": _render}
    return handlers[args.bench_command](args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cli", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub, prog="python -m bench.cli")
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_bench(args)
    except (ValueError, RuntimeError, OSError) as e:  # as server/cli.py does: a message, not a traceback
        print(f"bench {args.bench_command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
