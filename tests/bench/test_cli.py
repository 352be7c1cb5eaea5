"""``bench serve|engine|compare-official`` through bench/cli.py: the hook server/cli.py uses, and
each bench writing its JSON and Markdown (serve also its plots) into --out."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.cli import add_bench_parser, main, run_bench
from tests.bench.scripted_server import scripted


def parse(argv: list[str]) -> argparse.Namespace:
    # What server/cli.py does: the bench parser under its own subcommands, dispatched by name.
    parser = argparse.ArgumentParser(prog="makima-tts")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    return parser.parse_args(argv)


def test_serve_closed_loop_writes_json_markdown_and_plots(tmp_path, capsys):
    out = tmp_path / "out"
    with scripted() as server:
        args = parse(["bench", "serve", "--url", f"ws://127.0.0.1:{server.port}", "--concurrency", "1,2",
                      "--duration", "0.7", "--texts", "en-short", "--note", "scripted server", "--out", str(out)])
        assert run_bench(args) == 0
    report = json.loads((out / "serve-concurrency.json").read_text())
    assert report["mode"] == "concurrency" and [lv["load"] for lv in report["levels"]] == [1, 2]
    assert report["provenance"]["command"] and report["provenance"]["machine"]["cpu"]
    for level in report["levels"]:
        assert level["ok"] == level["utterances"] > 0 and level["records"]
        assert level["ttfa_ms"]["p50"] == pytest.approx(150, abs=100)  # the script's; a busy box overshoots
        assert level["underrun_share"] == 1.0  # the script's late chunk, in every utterance
    assert report["capacity"] is None  # nothing met "no underrun"
    md = (out / "serve-concurrency.md").read_text()
    assert "| sessions | utts |" in md and md.count("\n| 1 |") == 1 and md.count("\n| 2 |") == 1
    assert "closed loop" in md and "none of the loads tried" in md and "| note | scripted server |" in md
    assert md in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name in ("serve-concurrency-ttfa.png", "serve-concurrency-throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md
    # render: the same report again from its JSON, with a new note.
    (out / "serve-concurrency-ttfa.png").unlink()
    assert main(["render", str(out / "serve-concurrency.json"), "--note", "again"]) == 0
    again = (out / "serve-concurrency.md").read_text()
    assert "| note | again |" in again and again.replace("again", "scripted server") == md
    assert (out / "serve-concurrency-ttfa.png").is_file()


def test_serve_open_loop_and_a_lenient_target(tmp_path):
    with scripted() as server:
        code = main(["serve", "--url", f"ws://127.0.0.1:{server.port}", "--rate", "2,4", "--duration", "1",
                     "--slo-underruns", "1", "--slo-ttfa-ms", "1000", "--seed", "3", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "serve-rate.json").read_text())
    assert report["capacity"] == 4 and all(lv["goodput"]["share"] == 1.0 for lv in report["levels"])
    assert "open loop" in (tmp_path / "serve-rate.md").read_text()


def test_bad_arguments_and_an_unreachable_server_fail_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["bench", "serve", "--url", "ws://x", "--concurrency", "1", "--rate", "1", "--out", "d"])
    assert main(["serve", "--url", "ws://127.0.0.1:9", "--concurrency", "1.5", "--out", str(tmp_path)]) == 2
    assert "whole numbers" in capsys.readouterr().err
    assert main(["serve", "--url", "ws://127.0.0.1:9", "--ready-timeout", "0.3", "--duration", "1",
                 "--out", str(tmp_path)]) == 2
    assert "not ready" in capsys.readouterr().err
    assert main(["serve", "--url", "ws://127.0.0.1:9", "--texts", "no-such-set", "--out", str(tmp_path)]) == 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


def test_engine_bench_writes_json_and_markdown(tiny, tmp_path):
    assert main(["engine", "--model", str(tiny), "--sessions", "1,2", "--frames", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "engine.json").read_text())
    assert [r["sessions"] for r in report["runs"]] == [1, 2] and report["runs"][1]["frames"] == 6
    assert report["provenance"]["date"] and report["frames_per_request"] == 3
    md = (tmp_path / "engine.md").read_text()
    assert "`bench engine`" in md and md.count("\n| 1 |") == 1 and "peak RSS" in md
    assert main(["render", str(tmp_path / "engine.json"), "--note", "n"]) == 0
    again = (tmp_path / "engine.md").read_text()
    assert "| note | n |\n" in again and again.replace("| note | n |\n", "") == md


def test_engine_bench_arrivals_modes_report_the_counters(tiny, tmp_path):
    assert main(["engine", "--model", str(tiny), "--closed-loop", "3", "--utterances", "2", "--stagger-ms", "20",
                 "--rate", "4", "--duration", "0.5", "--frames", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "engine.json").read_text())
    assert report["runs"] == []  # an arrivals mode alone: no start-together rows
    closed, opened = report["arrivals"]
    assert (closed["mode"], closed["level"], closed["utterances"]) == ("closed", 3, 6)
    assert opened["mode"] == "open" and opened["errors"] == closed["errors"] == 0
    for run in (closed, opened):
        c = run["counters"]
        assert c["engine_steps"] > 0 and c["prefill_rows"] > 0 and c["host_syncs"] <= c["engine_steps"]
        if run["frames"]:
            assert run["static_share"] == 1.0 and c["decode_rows{path=eager}"] == 0
    assert closed["frames"] > 0
    md = (tmp_path / "engine.md").read_text()
    assert "| closed loop, sessions 3 | 6 |" in md and "| open loop, /s 4 |" in md and "static %" in md


def test_compare_official_without_the_official_side(tiny, tmp_path):
    assert main(["compare-official", "--model", str(tiny), "--no-official", "--frames", "2", "4",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare-official.json").read_text())
    # Only the plumbing: a tiny model's per-frame difference over 2 frames is timing noise.
    assert report["official"] is None and isinstance(report["ours"]["s_per_frame"], float)
    assert report["frames"] == [2, 4] and report["floor"]["floor_s_per_frame"] > 0
    md = (tmp_path / "compare-official.md").read_text()
    assert "| makima-tts |" in md and "ours / floor" in md


def test_compare_official_names_a_missing_oracle(tiny, tmp_path, capsys):
    assert main(["compare-official", "--model", str(tiny), "--oracle-python", str(tmp_path / "nope"),
                 "--out", str(tmp_path)]) == 2
    assert "--no-official" in capsys.readouterr().err
