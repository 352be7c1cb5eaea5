"""What the benches hand a person: aggregates, Markdown tables, PNG plots, JSON, and the run's
provenance (machine, date, commit, exact command), so a number in bench/RESULTS.md can be traced
and rerun. The serve plots are drawn by bench/plots.py.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FRAME_S = 0.08  # one codec frame is 80 ms of audio


# ---- provenance ----------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> dict:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "gpus": _gpus(), "python": platform.python_version(), "host_os": platform.platform(terse=True)}


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" (uncommitted changes in the tree)" if dirty else "")


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``makima-tts ...`` from the entry point, ``python -m bench.cli ...`` from a module."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0])
    if prog.suffix == ".py":
        try:
            module = ".".join(prog.resolve().relative_to(ROOT).with_suffix("").parts)
            head = ["python", "-m", module]
        except ValueError:
            head = ["python", str(prog)]
    else:
        head = [prog.name]
    return shlex.join(head + argv[1:])


def provenance(note: str | None = None) -> dict:
    # The load average at the end says whether other work shared the machine during the run.
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
            "command": command_line(), "machine": machine(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "note": note}


def machine_line(m: dict) -> str:
    gpu = ", ".join(m["gpus"]) if m["gpus"] else "no GPU"
    return f"{m['cpu']} ({m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB), {gpu}"


# ---- outputs --------------------------------------------------------------------------------------
def md_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        return "–" if v is None else str(v)

    # The first column names the row (left); the rest are numbers (right-aligned, so digits line up).
    lines = ["| " + " | ".join(headers) + " |", "|:---|" + "|".join("---:" for _ in headers[1:]) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def md_header(title: str, prov: dict, facts: list[tuple[str, str]]) -> str:
    rows = [("date", prov["date"]), ("machine", machine_line(prov["machine"])),
            ("commit", prov["commit"] or "unknown"), *facts, ("command", f"`{prov['command']}`")]
    if prov.get("note"):
        rows.append(("note", prov["note"]))
    if prov.get("load_avg"):
        l1, l5, l15 = prov["load_avg"]
        rows.insert(2, ("load", f"{l1:.2f} / {l5:.2f} / {l15:.2f} (1/5/15-min load average at the end, "
                                f"{prov['machine']['logical_cpus']} CPUs: above that, other work shared them)"))
    return "\n".join([f"### {title}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def write_report(out_dir: Path, stem: str, data: dict, markdown: str, compact: bool = False) -> list[Path]:
    """``compact``: one line of JSON (a serve report holds every chunk of every utterance: indented,
    it is three times the size in the repository for no reader's benefit)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    layout: dict = {"separators": (",", ":")} if compact else {"indent": 2}
    text = json.dumps(data, ensure_ascii=False, default=str, **layout)
    paths[0].write_text(text + "\n")
    paths[1].write_text(markdown.rstrip() + "\n")
    return paths


def fmt(v: float | None, digits: int = 0, scale: float = 1.0) -> str | None:
    return None if v is None else f"{v * scale:.{digits}f}"


# ---- serve: aggregates -----------------------------------------------------------------------------
@dataclass
class Slo:
    ttfa_ms: float = 200.0  # what a voice agent needs to feel immediate (peers publish 100–400 ms)
    max_underruns: int = 0  # any gap a listener hears fails the utterance
    share: float = 0.95  # capacity: the highest load at which this share of utterances meets the target


def percentiles(values: list[float], scale: float = 1.0) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, dtype=float) * scale
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(a.mean()), "max": float(a.max())}


def summarise(records: list[dict], mode: str, load: float, duration_s: float, elapsed_s: float,
              lag_s: list[float], setup_s: list[float], slo: Slo) -> dict:
    """One load level's aggregates from its utterance records (``Utterance.record``)."""
    ok = [r for r in records if r["ok"]]
    good = [r for r in ok if r["ttfa_s"] is not None and r["ttfa_s"] * 1000 <= slo.ttfa_ms
            and r["underruns"] <= slo.max_underruns]
    # Throughput inside the measured window only: the drain after it runs at falling load.
    window_audio = sum(s for r in records for a, s in r["chunks"] if r["start_s"] + a <= duration_s)
    underrun = [r for r in ok if r["underruns"] > 0]
    return {
        "mode": mode, "load": load, "duration_s": duration_s, "elapsed_s": elapsed_s,
        "utterances": len(records), "ok": len(ok), "errors": dict(Counter(r["error"] for r in records if r["error"])),
        "started_per_s": len(records) / duration_s if duration_s else None,
        "ttfa_ms": percentiles([r["ttfa_s"] for r in ok if r["ttfa_s"] is not None], 1000),
        "e2e_s": percentiles([r["e2e_s"] for r in ok]),
        "rtf": percentiles([r["rtf"] for r in ok if r["rtf"] is not None]),
        "server_ttfa_ms": percentiles([r["server_ttfa_ms"] for r in ok if r["server_ttfa_ms"] is not None]),
        "final_text_ttfa_ms": percentiles([r["final_text_ttfa_s"] for r in ok
                                           if r.get("final_text_ttfa_s") is not None], 1000),
        "final_text_e2e_ms": percentiles([r["final_text_e2e_s"] for r in ok
                                          if r.get("final_text_e2e_s") is not None], 1000),
        "underrun_utterances": len(underrun), "underrun_share": len(underrun) / len(ok) if ok else None,
        "underruns_total": sum(r["underruns"] for r in ok),
        "stall_ms": {"total": 1000 * sum(r["stall_s"] for r in ok),
                     **(percentiles([r["stall_s"] for r in ok], 1000) or {})},
        "audio_s": sum(r["audio_s"] for r in records),
        "audio_s_per_s": window_audio / duration_s if duration_s else None,
        "mean_utterance_audio_s": float(np.mean([r["audio_s"] for r in ok])) if ok else None,
        "goodput": {"utterances": len(good), "share": len(good) / len(records) if records else None,
                    "per_s": len(good) / elapsed_s if elapsed_s else None},
        "client_lag_ms": percentiles(lag_s, 1000), "sessions_opened": len(setup_s),
        "session_setup_ms": percentiles(setup_s, 1000),
    }


def capacity(levels: list[dict], slo: Slo) -> float | None:
    """The highest load at which ``slo.share`` of utterances met the target: the knee. A lower load
    that fell short is not hidden: ``shortfalls`` names it (a short run's one unlucky utterance, or
    a real instability)."""
    ok = [s["load"] for s in levels if s["goodput"]["share"] is not None and s["goodput"]["share"] >= slo.share]
    return max(ok, default=None)


def shortfalls(levels: list[dict], slo: Slo, below: float | None) -> list[dict]:
    """Levels under the capacity that missed the share."""
    if below is None:
        return []
    return [s for s in sorted(levels, key=lambda s: s["load"]) if s["load"] < below
            and (s["goodput"]["share"] is None or s["goodput"]["share"] < slo.share)]


# ---- serve: Markdown ---------------------------------------------------------------------------------
MODE_WORDS = {"concurrency": ("closed loop", "sessions", "c"), "rate": ("open loop, Poisson arrivals", "rate /s",
                                                                       "rate")}


def load_label(load: float) -> str:
    return f"{load:g}"


def serve_markdown(report: dict, plots: list[str]) -> str:
    mode, slo, cfg, server = report["mode"], report["slo"], report["config"], report["server"]
    words, load_head, short = MODE_WORDS[mode]
    noise = " (random weights: audio is noise)" if server.get("noise") else ""
    facts = [("server", f"{server.get('model')}{noise} at {server['speak_url']}"), ("voice", server["voice_used"]),
             ("texts", f"{cfg['texts']} ({cfg['text_count']} utterances), language {cfg['language']}"),
             ("per level", f"{cfg['duration_s']:g} s of arrivals, then the utterances in flight finish; "
                           f"seed {cfg['seed']}"),
             ("target", f"TTFA ≤ {slo['ttfa_ms']:g} ms and {_underruns_allowed(slo['max_underruns'])} "
                        f"(playback starts at the first byte{_preroll(cfg)})")]
    rows = []
    for s in report["levels"]:
        t, e, r, stall = s["ttfa_ms"] or {}, s["e2e_s"] or {}, s["rtf"] or {}, s["stall_ms"]
        errors = sum(s["errors"].values())
        rows.append([load_label(s["load"]), s["utterances"], errors or 0, fmt(t.get("p50")), fmt(t.get("p95")),
                     fmt(t.get("p99")), fmt(e.get("p50"), 2), fmt(e.get("p95"), 2), fmt(r.get("p50"), 2),
                     fmt(r.get("p95"), 2), f"{s['underrun_utterances']} ({fmt(s['underrun_share'], 0, 100)} %)"
                     if s["underrun_share"] is not None else None, fmt(stall.get("p95")),
                     fmt(s["audio_s_per_s"], 2), f"{fmt(s['goodput']['share'], 0, 100)} %"
                     if s["goodput"]["share"] is not None else None, fmt((s["client_lag_ms"] or {}).get("p99"))])
    table = md_table([load_head, "utts", "errors", "TTFA p50 ms", "p95", "p99", "E2E p50 s", "p95", "RTF p50", "p95",
                      "underrun utts", "stall p95 ms", "audio s/s", "goodput", "client lag p99 ms"], rows)
    cap = report["capacity"]
    knee = (f"**Capacity** (highest load with ≥ {100 * slo['share']:.0f} % of utterances on target): "
            + (f"{short} = {load_label(cap)}." if cap is not None else "none of the loads tried."))
    dips = shortfalls(report["levels"], Slo(**slo), cap)
    if dips:
        named = ", ".join(f"{short} = {load_label(s['load'])} ({fmt(s['goodput']['share'], 0, 100)} %)" for s in dips)
        knee += f" Below it, {named} fell short: look at its utterances before trusting the knee."
    errors = Counter()
    for s in report["levels"]:
        errors.update(s["errors"])
    notes = [knee]
    if errors:
        notes.append("Errors: " + ", ".join(f"{code} × {n}" for code, n in errors.most_common()) + ".")
    fed = cfg.get("text_input", "speak")
    if fed != "speak":
        lines = [f"{load_label(s['load'])}: first audio after it p50 {fmt((s['final_text_ttfa_ms'] or {}).get('p50'))} "
                 f"ms p95 {fmt((s['final_text_ttfa_ms'] or {}).get('p95'))} ms, end p50 "
                 f"{fmt((s['final_text_e2e_ms'] or {}).get('p50'))} ms" for s in report["levels"]]
        notes.append(f"Text sent word by word ({fed}, a word every {cfg['word_interval_ms']:g} ms): TTFA counts from "
                     "the first word. After the last text (`end` or `flush`): " + "; ".join(lines) + ".")
    notes.append("TTFA: `speak` sent → first audio byte, at the client. RTF: end-to-end time / audio time. "
                 "Audio s/s: audio received inside the measured window per second. Client lag: this client's "
                 "event-loop delay (high values mean the client, not the server, was the bottleneck).")
    images = [f"![{p}]({p})" for p in plots]
    return "\n\n".join([md_header(f"`bench serve`, {words}", report["provenance"], facts), table, *notes, *images])


def _underruns_allowed(n: int) -> str:
    return "no underrun" if n == 0 else f"at most {n} underrun{'s' if n > 1 else ''}"


def _preroll(cfg: dict) -> str:
    return f" + {cfg['preroll_ms']:g} ms pre-roll" if cfg.get("preroll_ms") else ""


# ---- engine and compare-official: Markdown ---------------------------------------------------------------
def precision_fact(p: dict) -> str:
    """The engine's weight plan (engine/precision.py) as one line."""
    timed = f"; GEMV µs {p['gemv_us']}" if p.get("gemv_us") else ""
    return f"{p['weights']} ({p['reason']}; ISA {p['isa']} from {p['isa_source']}{timed})"


def engine_markdown(report: dict) -> str:
    runs = report["runs"]
    base = runs[0]["frames_per_s"] if runs else 1.0
    rows = []
    for r in runs:
        split = r["split_s"]
        busy = sum(split.get(k, 0.0) for k in ("prefill_s", "talker_s", "predictor_s", "sample_s", "codec_s")) or 1.0
        share = " / ".join(f"{100 * split.get(k, 0.0) / busy:.0f}" for k in ("prefill_s", "talker_s", "predictor_s",
                                                                              "sample_s", "codec_s"))
        rows.append([r["sessions"], r["frames"], f"{r['frames_per_s']:.1f}", f"{r['frames_per_s'] / base:.2f}",
                     f"{r['frames_per_s'] * FRAME_S:.2f}", f"{1000 * r['decode_step_s']:.1f}",
                     f"{1000 * r['ttfa_s']['min']:.0f}–{1000 * r['ttfa_s']['max']:.0f}", share,
                     f"{100 * r['scheduler_overhead']:.1f}", *_counter_cells(r.get("counters"))])
    tables = []
    if rows:
        tables.append(md_table(["sessions", "frames (all)", "frames/s", "× of first", "audio s/s", "talker step ms",
                                "TTFA ms", "prefill / talker / predictor / sample / codec %", "scheduler %",
                                *COUNTER_COLUMNS], rows))
    arrivals = report.get("arrivals") or []
    if arrivals:
        setup = report.get("arrivals_setup", {})
        rows = [[("closed loop, sessions" if a["mode"] == "closed" else "open loop, /s") + f" {a['level']:g}",
                 a["utterances"], a["frames"], f"{a['frames_per_s']:.1f}", f"{a['frames_per_s'] * FRAME_S:.2f}",
                 None if a["ttfa_s"] is None else f"{1000 * a['ttfa_s']['p50']:.0f} / {1000 * a['ttfa_s']['p95']:.0f}",
                 a["errors"], *_counter_cells(a["counters"])] for a in arrivals]
        tables.append(f"Arrivals (closed loop: {setup.get('utterances_per_session')} utterances per session, "
                      f"sessions {1000 * setup.get('stagger_s', 0):.0f} ms apart; open loop: Poisson for "
                      f"{setup.get('duration_s')} s; lengths mixed ½×, 1×, 2× the frame count):")
        tables.append(md_table(["run", "utterances", "frames", "frames/s", "audio s/s", "TTFA p50 / p95 ms", "errors",
                                *COUNTER_COLUMNS], rows))
    mem = f"peak RSS {report['peak_rss_gb']:.2f} GB"
    if "cuda_max_allocated_gb" in report:
        mem += f", CUDA max allocated {report['cuda_max_allocated_gb']:.2f} GB"
    threads = f"{report['threads']} torch thread{'s' if report['threads'] != 1 else ''}"
    device = f"{report['device']}, {threads}"
    if report["device"] == "cuda":
        device += ", decode steps from CUDA graphs" if report.get("cuda_graphs") else ", eager (no CUDA graphs)"
    facts = [("model", report["model"]), ("device", device),
             ("start-up", f"{report.get('startup_s', float('nan')):.1f} s to load (and capture graphs)"),
             ("work", f"each session {report.get('frames_per_request', '?')} frames, greedy, x-vector voice"),
             ("memory", mem)]
    if report.get("precision"):
        facts.append(("weights", precision_fact(report["precision"])))
    note = ("TTFA here is inside the engine (submit → first audio chunk), without the server or network. "
            "The split is the share of model time per stage.")
    return "\n\n".join([md_header("`bench engine`", report["provenance"], facts), *tables, note])


COUNTER_COLUMNS = ["steps", "decode rows static / eager", "static %", "prefill rows", "host syncs / step"]


def _counter_cells(c: dict | None) -> list[object]:
    """The engine counters of one run (reports written before they existed have none)."""
    if not c:
        return [None] * len(COUNTER_COLUMNS)
    static, eager, steps = c["decode_rows{path=static}"], c["decode_rows{path=eager}"], c["engine_steps"]
    share = f"{100 * static / (static + eager):.2f}" if static + eager else None
    return [steps, f"{static} / {eager}", share, c["prefill_rows"], f"{c['host_syncs'] / steps:.2f}" if steps else None]


def compare_markdown(report: dict) -> str:
    ours, theirs, floor = report["ours"], report.get("official"), report["floor"]

    def row(name: str, r: dict | None) -> list[object]:
        if r is None:
            return [name, None, None, None, None]
        return [name, f"{1000 * r['s_per_frame']:.1f}", f"{1000 * r['decode_s_per_frame']:.2f}",
                f"{r['load_s']:.1f}", r.get("threads")]

    rows = [row("makima-tts", ours), row("official qwen-tts", theirs),
            ["memory-bandwidth floor", f"{1000 * floor['floor_s_per_frame']:.2f}", None, None, None]]
    table = md_table(["", "generate ms/frame", "codec decode ms/frame", "load s", "threads"], rows)
    ratios = [f"ours / floor = {report['ours_vs_floor']:.1f}×"]
    if theirs:
        ratios.insert(0, f"official / ours = {report['official_vs_ours']:.2f}× (above 1: we are faster)")
    facts = [("model", report["model"]), ("text", report["text"]),
             ("frames", " and ".join(map(str, report["frames"])) + " (per-frame time = difference / frame difference)")]
    if ours.get("precision"):
        facts.append(("our weights", precision_fact(ours["precision"])))
    return "\n\n".join([md_header("`bench compare-official`", report["provenance"], facts), table,
                        "; ".join(ratios) + "."])


# ---- progress --------------------------------------------------------------------------------------------
class Progress:
    """One status line on stderr, redrawn in place; silent when stderr is not a terminal (logs, CI)."""

    WIDTH = 24

    def __init__(self, label: str, duration_s: float, stream=None) -> None:
        self.label, self.duration_s = label, duration_s
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.drawn = False

    def __call__(self, elapsed_s: float, done: int, in_flight: int, errors: int) -> None:
        if not self.enabled:
            return
        frac = min(elapsed_s / self.duration_s, 1.0) if self.duration_s else 1.0
        bar = "#" * int(frac * self.WIDTH)
        phase = "finishing" if elapsed_s > self.duration_s else f"{elapsed_s:5.1f}/{self.duration_s:g} s"
        self.stream.write(f"\r{self.label} [{bar:<{self.WIDTH}}] {phase}  done {done}  in flight {in_flight}"
                          f"  errors {errors}\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
