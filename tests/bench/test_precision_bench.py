"""The benches take --weights, say which format ran and why, and count that format's bytes in the floor."""

import json

import pytest

from bench.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "tiny", seed=0)


def test_compare_official_runs_int8_and_counts_its_bytes(tiny, tmp_path):
    assert main(["compare-official", "--model", str(tiny), "--no-official", "--frames", "2", "3", "--weights", "int8",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "compare-official.json").read_text())
    assert report["ours"]["precision"]["weights"] == "int8" and report["floor"]["bytes_per_weight"] == 1
    assert "| our weights | int8 (requested --weights int8;" in (tmp_path / "compare-official.md").read_text()


def test_engine_bench_reports_the_weight_plan(tiny, tmp_path):
    assert main(["engine", "--model", str(tiny), "--sessions", "1", "--frames", "2", "--weights", "bf16",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "engine.json").read_text())
    assert report["precision"]["weights"] == "bf16" and report["precision"]["cpu_threads"] == 1
    assert "| weights | bf16 (requested --weights bf16;" in (tmp_path / "engine.md").read_text()
