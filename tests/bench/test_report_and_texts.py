"""The pieces under the benches: the playback clock, aggregates and the capacity (knee), the
Markdown, the progress line, provenance, and the built-in text sets."""

from __future__ import annotations

import io

import pytest

from bench.report import Progress, Slo, capacity, command_line, md_table, percentiles, shortfalls, summarise
from bench.texts import LANGUAGES, LENGTHS, builtin_sets, load_texts
from bench.ws_client import playback


def test_playback_clock_counts_each_late_chunk_and_its_silence():
    # 80 ms at 0, 80 ms at 50 (on time), 160 ms at 200 (due at 160: 40 ms late), 80 ms at 350 (due at 360).
    p = playback([(0.0, 0.08), (0.05, 0.08), (0.20, 0.16), (0.35, 0.08)])
    assert p.underruns == 1 and p.late_chunks == [2] and p.stall_s == pytest.approx(0.04)
    # Two late chunks in a row: playback resumes when each arrives.
    p = playback([(0.1, 0.08), (0.3, 0.08), (0.5, 0.08)])
    assert p.late_chunks == [1, 2] and p.stall_s == pytest.approx(0.12 + 0.12)
    assert playback([]).underruns == 0 and playback([(0.2, 1.0)]).stall_s == 0.0
    assert playback([(0.0, 0.08), (0.1, 0.08)], preroll_s=0.05).underruns == 0


def record(ttfa_ms: float, underruns: int = 0, ok: bool = True, start_s: float = 0.0, audio_s: float = 1.0) -> dict:
    return {"ok": ok, "error": None if ok else "SYNTHESIS_ERROR", "ttfa_s": ttfa_ms / 1000, "e2e_s": 0.5,
            "audio_s": audio_s, "rtf": 0.5 / audio_s, "underruns": underruns, "stall_s": 0.01 * underruns,
            "server_ttfa_ms": None, "start_s": start_s, "chunks": [[ttfa_ms / 1000, audio_s]]}


def test_summary_goodput_and_throughput_window():
    recs = [record(100), record(150), record(300), record(120, underruns=2), record(0, ok=False),
            record(100, start_s=9.95)]  # its audio arrives after the 10 s window: not counted in audio s/s
    s = summarise(recs, "rate", 1.0, 10.0, 12.0, [0.001], [0.02], Slo(ttfa_ms=200))
    assert s["utterances"] == 6 and s["ok"] == 5 and s["errors"] == {"SYNTHESIS_ERROR": 1}
    assert s["goodput"]["utterances"] == 3 and s["goodput"]["share"] == pytest.approx(0.5)
    assert s["goodput"]["per_s"] == pytest.approx(3 / 12)
    assert s["underrun_utterances"] == 1 and s["underruns_total"] == 2
    assert s["audio_s_per_s"] == pytest.approx(5 / 10) and s["audio_s"] == 6
    assert percentiles([1, 2, 3, 4], 1000)["p50"] == 2500 and percentiles([]) is None


def test_capacity_is_the_last_load_before_the_knee():
    def level(load: float, share: float) -> dict:
        return {"load": load, "goodput": {"share": share}}

    slo = Slo(share=0.95)
    assert capacity([level(16, 0.5), level(1, 1.0), level(4, 0.97), level(8, 0.96)], slo) == 8
    assert capacity([level(1, 0.5), level(2, 0.9)], slo) is None
    # A dip below the knee (one unlucky utterance in a short run) does not hide the knee, but is named.
    dipped = [level(1, 0.94), level(2, 1.0), level(4, 0.97), level(8, 0.6)]
    assert capacity(dipped, slo) == 4 and [s["load"] for s in shortfalls(dipped, slo, 4)] == [1]


def test_markdown_table_and_progress_line():
    table = md_table(["c", "TTFA"], [[1, "12"], [2, None]])
    assert table.splitlines() == ["| c | TTFA |", "|:---|---:|", "| 1 | 12 |", "| 2 | – |"]
    quiet = io.StringIO()
    Progress("c=1", 10, quiet)(1.0, 2, 1, 0)
    assert quiet.getvalue() == ""  # not a terminal: nothing

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = Progress("c=4", 10, tty)
    bar(5.0, 7, 4, 1)
    bar(11.0, 9, 2, 1)
    bar.close()
    out = tty.getvalue()
    assert out.startswith("\rc=4 [############") and "done 7  in flight 4  errors 1" in out
    assert "finishing" in out and out.endswith("\n")


def test_command_line_reads_as_typed():
    assert command_line(["/usr/local/bin/makima-tts", "bench", "serve", "--url", "ws://h:1"]) == \
        "makima-tts bench serve --url ws://h:1"
    from bench import cli

    assert command_line([cli.__file__, "serve", "--texts", "a b"]) == "python -m bench.cli serve --texts 'a b'"


def test_text_sets_cover_both_languages_and_three_lengths(tmp_path):
    assert builtin_sets() == sorted(f"{lang}-{length}" for lang in LANGUAGES for length in LENGTHS)
    mean = {}
    for lang in LANGUAGES:
        for length in LENGTHS:
            texts = load_texts(f"{lang}-{length}")
            assert len(texts) >= 4 and len({t.text for t in texts}) == len(texts)
            assert all(t.id.startswith(f"{lang}-{length}:") for t in texts)
            mean[lang, length] = sum(len(t.text) for t in texts) / len(texts)
        assert mean[lang, "short"] < mean[lang, "medium"] < mean[lang, "long"]
    assert any("\u4e00" <= c <= "\u9fff" for t in load_texts("zh") for c in t.text)
    assert len(load_texts("medium")) == len(load_texts("en-medium")) + len(load_texts("zh-medium"))
    assert len(load_texts("all")) == sum(len(load_texts(s)) for s in builtin_sets())
    f = tmp_path / "mine.txt"
    f.write_text("# comment\nFirst line.\n\n  Second line.  \n")
    assert [(t.id, t.text) for t in load_texts(str(f))] == [("mine:2", "First line."), ("mine:4", "Second line.")]
    with pytest.raises(ValueError, match="neither a built-in set"):
        load_texts("klingon-long")
