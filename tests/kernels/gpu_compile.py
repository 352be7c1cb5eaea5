"""Compile every kernel variant for a real NVIDIA target on a machine without a GPU.

The interpreter does not check GPU-only rules (tl.dot minimum shapes, loop-carried types, register
pressure), so an interpreter-green kernel can still fail to compile on a GPU. Triton's compiler and
ptxas ship in the wheel and need no device: this script swaps in a stand-in driver that only names
the target, turns each launch into a compile (``warmup``), runs the real launchers at Qwen3 shapes,
and reports registers and spills from ``cuobjdump``. Run it with the interpreter off:

    TRITON_INTERPRET=0 python -m tests.kernels.gpu_compile [--arch 90] [--dtypes bfloat16 float16 float32]

Exit status 1 if a kernel fails to compile or a 16-bit variant spills registers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class _TargetOnlyDriver:
    """Enough of a driver for ``JITFunction.run`` to compile: a target, a device id, a stream id."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread; stack > 0 means spills."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


def _launch_everything(dtype: torch.dtype) -> None:
    """Every launcher once per code path (norm with and without residual, rope with and without q/k norm
    and cache, decode with 1 and 4 splits (a narrow and a wide block table), prefill),
    at the talker geometry (16/8 x 128) and the codec decoder's (16/16 x 64)."""
    from kernels.activation import silu_and_mul_triton
    from kernels.decode_attention import paged_decode_attention_triton
    from kernels.norm import fused_add_rms_norm_triton, rms_norm_triton
    from kernels.prefill_attention import paged_prefill_attention_triton
    from kernels.rope import qk_norm_rope_store_kv_triton, rope_cos_sin_cache

    x, w = torch.zeros(4, 1024, dtype=dtype), torch.zeros(1024, dtype=dtype)
    rms_norm_triton(x, w, 1e-6)
    fused_add_rms_norm_triton(x, x, w, 1e-6)
    silu_and_mul_triton(torch.zeros(4, 2 * 3072, dtype=dtype))
    for hq, hk, d, norm in ((16, 8, 128, True), (16, 16, 64, False)):
        cache = torch.zeros(8, 16, hk, d, dtype=dtype)
        qkv = torch.zeros(5, (hq + 2 * hk) * d, dtype=dtype)
        qw = torch.zeros(d, dtype=dtype) if norm else None
        slots = torch.arange(5, dtype=torch.int32)
        cos_sin = rope_cos_sin_cache(64, d, 1e6)
        qk_norm_rope_store_kv_triton(qkv, torch.arange(5), cos_sin, hq, hk, qw, qw, 1e-6, cache, cache, slots)
        qk_norm_rope_store_kv_triton(qkv, torch.arange(5), cos_sin, hq, hk, qw, qw, 1e-6, None, None, None)
        for num_seqs in (1, 3):  # Triton specialises integer arguments equal to 1
            lens = torch.full((num_seqs,), 100, dtype=torch.int32)
            q = torch.zeros(num_seqs, hq, d, dtype=dtype)
            cu = torch.arange(num_seqs + 1, dtype=torch.int32) * 10
            q_prefill = torch.zeros(10 * num_seqs, hq, d, dtype=dtype)
            # 8 blocks (128 keys) give 1 split, 64 blocks (1024 keys) 4 at these batches (decode_num_splits).
            for width in (8, 64):
                tables = torch.zeros(num_seqs, width, dtype=torch.int32)
                paged_decode_attention_triton(q, cache, cache, tables, lens, 0.1)
            paged_prefill_attention_triton(q_prefill, cache, cache, tables[:, :8], cu, lens, 0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 90 for H100/H200, 80 for A100")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the interpreter does not compile")

    driver.set_active(_TargetOnlyDriver(args.arch))
    compiled: list[tuple[str, torch.dtype, object]] = []
    current_dtype: list[torch.dtype] = []
    real_run = JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        kernel = real_run(self, *a, grid=grid, warmup=True, **kw)
        compiled.append((self.fn.__name__, current_dtype[0], kernel))
        return kernel

    JITFunction.run = compile_only
    import kernels._common

    kernels._common.INTERPRETED = True  # let CPU stand-in tensors past the launchers' device check

    for dtype in (getattr(torch, name) for name in args.dtypes):
        current_dtype[:] = [dtype]
        _launch_everything(dtype)

    failed = False
    seen = set()
    print(f"sm_{args.arch}: {len(compiled)} launches compiled")
    print(f"{'kernel':32} {'dtype':9} {'warps':>5} {'shared':>7} {'regs':>4} {'stack':>5}")
    for name, dtype, kernel in compiled:
        regs, stack = _resource_usage(kernel.asm["cubin"])
        row = (
            name,
            str(dtype).removeprefix("torch."),
            kernel.metadata.num_warps,
            kernel.metadata.shared,
            regs,
            stack,
        )
        if row in seen:
            continue
        seen.add(row)
        # fp32 runs only in GPU tests (serving is 16-bit); its IEEE dots run on FMA units and may spill.
        spills = stack > 0 and dtype != torch.float32
        failed |= spills
        print(
            f"{row[0]:32} {row[1]:9} {row[2]:5} {row[3]:7} {row[4]:4} {row[5]:5}"
            + ("  SPILLS" if spills else "")
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
