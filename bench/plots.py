"""PNG plots of a `bench serve` report: TTFA percentiles and throughput against load, drawn so the knee
of the latency curve shows. matplotlib is optional (the ``bench`` extra): without it the plots are
skipped with a note.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.report import MODE_WORDS, load_label


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _xy(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [x for x, _ in points], [y for _, y in points]


def _min_gap(loads: list[float]) -> float:
    gaps = [b - a for a, b in zip(loads, loads[1:], strict=False) if b > a]
    return min(gaps) if gaps else 1.0


def _load_axis(ax, loads: list[float], label: str) -> None:
    if len(loads) > 1 and max(loads) / max(min(loads), 1e-9) >= 4:
        ax.set_xscale("log", base=2)
    from matplotlib.ticker import NullLocator

    ax.set_xticks(loads)
    ax.set_xticklabels([load_label(x) for x in loads])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def plot_serve(report: dict, out_dir: Path, stem: str) -> list[str]:
    """TTFA percentiles and throughput against load, with the target and the capacity marked, so the
    knee of the latency curve is visible. Returns the file names written (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        print("bench: matplotlib is not installed (pip install 'makima-tts[bench]'); no plots", file=sys.stderr)
        return []
    levels = sorted(report["levels"], key=lambda s: s["load"])
    loads = [s["load"] for s in levels]
    slo, cap = report["slo"], report["capacity"]
    _, load_head, _ = MODE_WORDS[report["mode"]]
    xlabel = "concurrent sessions" if report["mode"] == "concurrency" else "arrival rate (utterances/s)"
    machine = report["provenance"]["machine"]
    title = f"{report['server'].get('model')} · {', '.join(machine.get('gpus') or []) or machine['cpu']}"
    names = []

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^--")):
        pts = [(s["load"], s["ttfa_ms"][key]) for s in levels if s["ttfa_ms"]]
        if pts:
            ax.plot(*_xy(pts), style, label=f"TTFA {key}")
    ax.axhline(slo["ttfa_ms"], color="tab:red", ls=":", label=f"target {slo['ttfa_ms']:g} ms")
    if cap is not None:
        ax.axvline(cap, color="gray", ls="--", lw=1, label=f"capacity ({load_label(cap)})")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")  # the knee is a change of slope; log keeps the low loads readable beside it
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("time to first audio (ms, log)")
    _load_axis(ax, loads, xlabel)
    ax.set_title(f"TTFA against load — {title}", fontsize=9)
    # Underruns fail utterances whose TTFA is fine: show them behind the curves so the capacity line
    # can be read from this plot alone.
    ax3 = ax.twinx()
    runs = [(s["load"], 100 * s["underrun_share"]) for s in levels if s["underrun_share"] is not None]
    if runs:
        width = [0.25 * x if ax.get_xscale() == "log" else 0.25 * _min_gap(loads) for x, _ in runs]
        ax3.bar(*_xy(runs), width=width, color="gray", alpha=0.25, label="utterances with an underrun (%)")
    ax3.set_ylim(0, 105)
    ax3.set_ylabel("% of utterances with an underrun", color="gray")
    ax.set_zorder(ax3.get_zorder() + 1)
    ax.patch.set_visible(False)
    h1, l1 = ax.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax.legend(h1 + h3, l1 + l3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    names.append(f"{stem}-ttfa.png")
    fig.savefig(out_dir / names[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    got = [(s["load"], s["audio_s_per_s"]) for s in levels if s["audio_s_per_s"] is not None]
    if got:
        ax.plot(*_xy(got), "o-", label="audio s/s received")
    ideal = _ideal_throughput(report["mode"], levels)
    if ideal:
        ax.plot(*_xy(ideal), ":", color="gray", label="offered" if report["mode"] == "rate" else "linear from first")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("audio seconds per second")
    _load_axis(ax, loads, xlabel)
    ax2 = ax.twinx()
    share = [(s["load"], 100 * s["goodput"]["share"]) for s in levels if s["goodput"]["share"] is not None]
    if share:
        ax2.plot(*_xy(share), "s-", color="tab:green", label="goodput (% on target)")
    ax2.set_ylim(0, 105)
    ax2.set_ylabel("% of utterances on target")
    if cap is not None:
        ax.axvline(cap, color="gray", ls="--", lw=1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=3, frameon=False)
    ax.set_title(f"Throughput against load — {title}", fontsize=9)
    fig.tight_layout()
    names.append(f"{stem}-throughput.png")
    fig.savefig(out_dir / names[-1])
    plt.close(fig)
    return names


def _ideal_throughput(mode: str, levels: list[dict]) -> list[tuple[float, float]]:
    # Closed loop: the first level scaled linearly; open loop: what the arrivals asked for. The gap
    # between this line and the measured one is where the server stops keeping up.
    if mode == "rate":
        return [(s["load"], s["load"] * s["mean_utterance_audio_s"]) for s in levels
                if s["mean_utterance_audio_s"] is not None]
    first = next((s for s in levels if s["audio_s_per_s"]), None)
    if first is None:
        return []
    return [(s["load"], first["audio_s_per_s"] * s["load"] / first["load"]) for s in levels]


