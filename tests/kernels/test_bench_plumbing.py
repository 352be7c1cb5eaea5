"""bench/kernels.py needs a GPU to time anything; this runs its plumbing (shapes, argument passing, byte
counts) on CPU with each Triton launcher swapped for its reference and the timers calling once."""

import types

import pytest
import torch

import bench.kernels as bk
from kernels import activation, norm, rope
from kernels import decode_attention as dec
from kernels import prefill_attention as pre


def test_bench_runs_end_to_end_on_cpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setattr(bk, "DEVICE", "cpu")
    for module, name in [(norm, "rms_norm"), (norm, "fused_add_rms_norm"), (activation, "silu_and_mul"),
                         (rope, "qk_norm_rope_store_kv"), (dec, "paged_decode_attention"),
                         (pre, "paged_prefill_attention")]:  # fmt: skip
        monkeypatch.setattr(module, f"{name}_triton", getattr(module, f"{name}_reference"))

    def call_once(fn, arg_sets, calls=0, **_):
        fn(*arg_sets[0])
        return 10.0

    monkeypatch.setattr(bk, "time_graph", call_once)
    monkeypatch.setattr(bk, "time_eager", call_once)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(L2_cache_size=2**20)
    )
    report = bk.Report(copy_bw=3e12)
    bk.bench_norm_and_mlp(report, torch.float32, 16)
    bk.bench_rope(report, torch.float32, 16)
    bk.bench_decode(report, torch.float32, "talker", 16, 8, 128, 2, 64)
    bk.bench_decode(report, torch.float32, "mha", 16, 16, 64, 2, 100)
    bk.bench_prefill(report, torch.float32, 1, 64, 64)
    bk.bench_prefill(report, torch.float32, 2, 16, 48)
    assert [row["op"] for row in report.rows] == [
        "rms_norm", "fused_add_rms_norm", "silu_and_mul", "qk_norm_rope_store_kv",
        "decode talker", "decode mha", "prefill talker", "prefill talker",
    ]  # fmt: skip
    # 2 sequences x 64 keys x 8 KV heads x 128 x (K and V) + q and out, fp32.
    assert report.rows[4]["bytes"] == 2 * (2 * 64 * 8 * 128 + 2 * 16 * 128) * 4
    assert "TFLOP/s" in capsys.readouterr().out


def test_bench_refuses_to_run_without_a_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bk._require_cuda()
