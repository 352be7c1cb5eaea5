"""Kernel timings on CUDA against the PyTorch references, as a share of device copy bandwidth.

For every kernel in ``kernels/`` at Qwen3-TTS talker shapes (hidden 1024, MLP 3072, 16/8 heads x 128),
batch 1..64 and context 64..2048:

- the Triton kernel, replayed from a CUDA graph (as the engine's decode step runs it), so launch
  overhead from Python does not hide the kernel;
- the PyTorch reference, eager (it reads lengths on the host and cannot be captured);
- for attention, ``scaled_dot_product_attention`` on KV already gathered into dense tensors.

Inputs rotate through enough copies to exceed 4x the L2 cache, so bandwidth is HBM bandwidth, as in a
real step where 28 layers each bring their own weights and KV. GB/s counts the bytes an op must move
(inputs read once, outputs written once; no split-K scratch), and "% copy" divides by a measured
device-to-device ``copy_`` of 1 GiB. Goal: >= 80 % for add+RMSNorm and decode attention once there is
enough work (batch >= 16, context >= 512); single-token ops are launch-latency bound at any speed.

    python -m bench.kernels [--dtype bfloat16] [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from functools import partial

import torch

from kernels import activation, norm, rope
from kernels import decode_attention as dec
from kernels import prefill_attention as pre

DEVICE = "cuda"  # a module constant so a CPU dry run of the plumbing can swap it


def _require_cuda() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("bench/kernels.py: unset TRITON_INTERPRET; the interpreter is for tests, not timings")
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU and none is visible here. On CPU the ops run their "
                 "PyTorch references; run this on a GPU machine.")  # fmt: skip


def time_graph(fn: Callable, arg_sets: list[tuple], calls: int = 64, replays: int = 10) -> float:
    """Microseconds per call of ``fn`` captured ``calls`` times into one CUDA graph, cycling ``arg_sets``."""
    for args in arg_sets[:2]:
        fn(*args)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    calls = max(calls, len(arg_sets))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*arg_sets[i % len(arg_sets)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


def time_eager(fn: Callable, arg_sets: list[tuple], calls: int = 32) -> float:
    """Microseconds per eager call, launch overhead and host syncs included."""
    for args in arg_sets[:2]:
        fn(*args)
    torch.cuda.synchronize()
    calls = max(calls, len(arg_sets))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fn(*arg_sets[i % len(arg_sets)])
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * 2**30 / (time_eager(dst.copy_, [(src,)], calls=20) * 1e-6)


def _copies(make: Callable[[], tuple], footprint: int, limit: int = 64) -> list[tuple]:
    """As many argument sets as it takes to exceed 4x L2, so no replay finds its inputs cached."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return [make() for _ in range(min(limit, max(1, math.ceil(4 * l2 / max(footprint, 1)))))]


class Report:
    def __init__(self, copy_bw: float) -> None:
        self.copy_bw = copy_bw
        self.rows: list[dict] = []
        print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s")
        print(f"{'op':22} {'shape':30} {'triton us':>9} {'GB/s':>6} {'% copy':>6} {'ref us':>8} "
              f"{'x ref':>6} {'sdpa us':>8}")  # fmt: skip

    def add(
        self, op: str, shape: str, nbytes: int, triton_us: float, ref_us: float, sdpa_us: float | None = None
    ):
        gbs = nbytes / (triton_us * 1e-6) / 1e9
        share = 100 * gbs * 1e9 / self.copy_bw
        sdpa = f"{sdpa_us:8.1f}" if sdpa_us is not None else ""
        print(f"{op:22} {shape:30} {triton_us:9.1f} {gbs:6.0f} {share:6.1f} {ref_us:8.1f} "
              f"{ref_us / triton_us:6.1f} {sdpa}")  # fmt: skip
        self.rows.append({"op": op, "shape": shape, "bytes": nbytes, "triton_us": triton_us, "gb_per_s": gbs,
                          "copy_share_pct": share, "reference_us": ref_us, "sdpa_us": sdpa_us})  # fmt: skip


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def bench_norm_and_mlp(report: Report, dtype: torch.dtype, tokens: int) -> None:
    size = torch.finfo(dtype).bits // 8
    hidden, inter, eps = 1024, 3072, 1e-6
    w = _randn(hidden, dtype=dtype)

    sets = _copies(lambda: (_randn(tokens, hidden, dtype=dtype),), 2 * tokens * hidden * size)
    report.add("rms_norm", f"T={tokens} H={hidden}", (2 * tokens + 1) * hidden * size,
               time_graph(partial(norm.rms_norm_triton, weight=w, eps=eps), sets),
               time_eager(partial(norm.rms_norm_reference, weight=w, eps=eps), sets))  # fmt: skip

    sets = _copies(lambda: (_randn(tokens, hidden, dtype=dtype), _randn(tokens, hidden, dtype=dtype)),
                   4 * tokens * hidden * size)  # fmt: skip
    report.add("fused_add_rms_norm", f"T={tokens} H={hidden}", (4 * tokens + 1) * hidden * size,
               time_graph(partial(norm.fused_add_rms_norm_triton, weight=w, eps=eps), sets),
               time_eager(partial(norm.fused_add_rms_norm_reference, weight=w, eps=eps), sets))  # fmt: skip

    sets = _copies(lambda: (_randn(tokens, 2 * inter, dtype=dtype),), 3 * tokens * inter * size)
    report.add("silu_and_mul", f"T={tokens} I={inter}", 3 * tokens * inter * size,
               time_graph(activation.silu_and_mul_triton, sets),
               time_eager(activation.silu_and_mul_reference, sets))  # fmt: skip


def bench_rope(report: Report, dtype: torch.dtype, tokens: int) -> None:
    size = torch.finfo(dtype).bits // 8
    hq, hk, d, block = 16, 8, 128, 16
    blocks = -(-tokens // block) + 1
    ones = torch.ones(d, dtype=dtype, device=DEVICE)
    fixed = {"cos_sin_cache": rope.rope_cos_sin_cache(4096, d, 1e6, device=DEVICE), "num_q_heads": hq,
             "num_kv_heads": hk, "q_norm_weight": ones, "k_norm_weight": ones, "eps": 1e-6}  # fmt: skip

    def make() -> tuple:
        cache = torch.zeros(blocks, block, hk, d, dtype=dtype, device=DEVICE)
        slots = torch.randperm(blocks * block, device=DEVICE)[:tokens].int()
        positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
        return (
            _randn(tokens, (hq + 2 * hk) * d, dtype=dtype),
            positions,
            cache,
            torch.zeros_like(cache),
            slots,
        )

    def call(fn: Callable) -> Callable:
        return lambda qkv, pos, kc, vc, slots: fn(qkv=qkv, positions=pos, k_cache=kc, v_cache=vc,
                                                  slot_mapping=slots, **fixed)  # fmt: skip

    # q and k read and written, v read, k and v written to the cache, positions and cos/sin read.
    nbytes = tokens * ((2 * (hq + hk) + 3 * hk) * d * size + d * 4 + 12)
    sets = _copies(make, nbytes)
    report.add("qk_norm_rope_store_kv", f"T={tokens} {hq}/{hk}x{d}", nbytes,
               time_graph(call(rope.qk_norm_rope_store_kv_triton), sets),
               time_eager(call(rope.qk_norm_rope_store_kv_reference), sets))  # fmt: skip


def _paged_kv(batch: int, context: int, hk: int, d: int, dtype: torch.dtype, block: int = 16) -> tuple:
    """A cache holding ``batch`` sequences of ``context`` tokens in shuffled blocks, tables and lengths."""
    per_seq = -(-context // block)
    k_cache = _randn(batch * per_seq, block, hk, d, dtype=dtype)
    tables = torch.randperm(batch * per_seq, device=DEVICE).int().view(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    return k_cache, torch.randn_like(k_cache), tables, lens


def _dense(cache: torch.Tensor, tables: torch.Tensor, end: int) -> torch.Tensor:
    """Tokens [0, end) gathered from the paged cache into [B, Hk, end, D]: what SDPA needs."""
    gathered = cache[tables.long()].view(tables.shape[0], -1, *cache.shape[2:])
    return gathered[:, :end].transpose(1, 2).contiguous()


def bench_decode(report: Report, dtype: torch.dtype, name: str, hq: int, hk: int, d: int,
                 batch: int, context: int) -> None:  # fmt: skip
    size = torch.finfo(dtype).bits // 8
    nbytes = batch * (2 * context * hk * d + 2 * hq * d) * size
    sets = _copies(
        lambda: (_randn(batch, hq, d, dtype=dtype), *_paged_kv(batch, context, hk, d, dtype)), nbytes
    )
    fixed = {"scale": d**-0.5}
    triton_us = time_graph(partial(dec.paged_decode_attention_triton, **fixed), sets)
    ref_us = time_eager(partial(dec.paged_decode_attention_reference, **fixed), sets[:2])
    dense = [(q[:, :, None], _dense(kc, t, context), _dense(vc, t, context)) for q, kc, vc, t, _ in sets]
    sdpa = partial(torch.nn.functional.scaled_dot_product_attention, scale=d**-0.5, enable_gqa=hq != hk)
    sdpa_us = time_graph(sdpa, dense)
    splits = dec.decode_num_splits(batch, hk, sets[0][3].shape[1] * 16, torch.device(DEVICE))
    shape = f"B={batch} ctx={context} splits={splits}"
    report.add(f"decode {name}", shape, nbytes, triton_us, ref_us, sdpa_us)


def bench_prefill(report: Report, dtype: torch.dtype, batch: int, new: int, context: int) -> None:
    """Compute bound: GB/s counts KV + q + out bytes; TFLOP/s is printed on the next line."""
    size = torch.finfo(dtype).bits // 8
    hq, hk, d = 16, 8, 128

    def make() -> tuple:
        q, (kc, vc, tables, lens) = (
            _randn(batch * new, hq, d, dtype=dtype),
            _paged_kv(batch, context, hk, d, dtype),
        )
        return q, kc, vc, tables, torch.arange(batch + 1, dtype=torch.int32, device=DEVICE) * new, lens

    nbytes = batch * (2 * context * hk + 2 * new * hq) * d * size
    sets = _copies(make, nbytes, limit=8)
    triton_us = time_graph(partial(pre.paged_prefill_attention_triton, scale=d**-0.5), sets, calls=8)
    ref_us = time_eager(partial(pre.paged_prefill_attention_reference, scale=d**-0.5), sets[:1], calls=4)
    sdpa_us = None
    if new == context:  # dense SDPA only covers fresh prompts (no cached prefix), with is_causal
        dense = [(q.view(batch, new, hq, d).transpose(1, 2).contiguous(), _dense(kc, t, context),
                  _dense(vc, t, context)) for q, kc, vc, t, _, _ in sets]  # fmt: skip
        sdpa = partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True, scale=d**-0.5,
                       enable_gqa=True)  # fmt: skip
        sdpa_us = time_graph(sdpa, dense, calls=8)
    report.add("prefill talker", f"B={batch} new={new} ctx={context}", nbytes, triton_us, ref_us, sdpa_us)
    flops = 4 * batch * hq * d * sum(context - new + i + 1 for i in range(new))
    print(f"{'':53} {flops / (triton_us * 1e-6) / 1e12:6.1f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="a few shapes per kernel")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    _require_cuda()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}")
    report = Report(copy_bandwidth())
    for tokens in [1, 16, 64, 2048] if args.quick else [1, 16, 64, 256, 2048, 16384]:
        bench_norm_and_mlp(report, dtype, tokens)
        bench_rope(report, dtype, tokens)
        torch.cuda.empty_cache()
    batches = [1, 16, 64] if args.quick else [1, 4, 16, 32, 64]
    contexts = [64, 512, 2048] if args.quick else [64, 512, 1024, 2048]
    for batch in batches:
        for context in contexts:
            bench_decode(report, dtype, "talker", 16, 8, 128, batch, context)
            torch.cuda.empty_cache()
    for batch, new, context in [(1, 512, 512), (1, 2048, 2048), (4, 256, 1024)]:
        bench_prefill(report, dtype, batch, new, context)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype,
                       "copy_gb_per_s": report.copy_bw / 1e9, "rows": report.rows}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
