"""Which weight format the transformer projections use, decided once at load from the CPU at hand.

A batch-1 frame reads every projection weight once (the talker) or fifteen times (the code
predictor), so its time is the weights' bytes over the memory bandwidth a GEMV reaches. bf16
halves the bytes, but only where the CPU multiplies bf16 natively (AVX512-BF16, AMX-BF16): on an
AVX2-only EPYC a bf16 matmul measured ~50x slower than fp32, because it is emulated. So:

- ``amx``: bf16, from the flags alone (AMX tiles are bf16 hardware; measured faster than fp32 at
  every batch on a Xeon);
- ``avx512_bf16`` / ``avx512``: a short one-thread GEMV timing, fp32 against bf16 through the same
  projection code the model runs; bf16 only when it is at least ``BF16_MIN_SPEEDUP`` faster;
- ``avx2`` (or anything else): fp32, from the flags alone.

``MAKIMA_CPU_ISA`` forces the ISA class, and a forced class skips the timing (the flag rule decides:
bf16 for ``amx`` / ``avx512_bf16``, fp32 for the others), so every path runs deterministically on any
machine and in tests. An explicit weight format (``--weights``, or ``--dtype float32`` for the
unchanged fp32 path) bypasses the probe. int8 is never chosen automatically: it changes the numbers
more than bf16 does (see tests/engine/test_precision.py), so it is opt-in.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ISA_ENV = "MAKIMA_CPU_ISA"
ISAS = ("avx2", "avx512", "avx512_bf16", "amx")
WEIGHT_FORMATS = ("fp32", "bf16", "int8")
# bf16 reads half the bytes, so a native bf16 GEMV is ~2x faster (3x measured on an EPYC with
# AVX512-BF16, where oneDNN's bf16 kernel also streams better than MKL's fp32 GEMV). Below 1.25x the
# kernel is compute-bound or emulated, and bf16's rounding would buy too little.
BF16_MIN_SPEEDUP = 1.25


@dataclass(frozen=True)
class WeightPlan:
    """The projections' weight format and why; ``/api/v1/info`` and the bench reports show ``as_dict()``."""

    weights: str  # one of WEIGHT_FORMATS
    isa: str  # one of ISAS, or the device type off CPU
    isa_source: str  # "cpuinfo", ISA_ENV, or "device"
    reason: str
    gemv_us: dict[str, float] = field(default_factory=dict)  # the probe's timings, when it ran

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's ISA flags (empty where /proc/cpuinfo is absent: not Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_from_flags(flags: set[str]) -> str:
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def detect_isa() -> tuple[str, str]:
    """(ISA class, where it came from): ``MAKIMA_CPU_ISA`` when set, else /proc/cpuinfo."""
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"{ISA_ENV}={forced!r}: expected one of {', '.join(ISAS)}")
        return forced, ISA_ENV
    return isa_from_flags(cpu_flags()), "cpuinfo"


def measure_gemv_us(weights: str, out_features: int = 4096, in_features: int = 1024, matrices: int = 4,
                    repeats: int = 5) -> float:
    """Best one-thread time (µs) of one projection in ``weights`` format over ``matrices`` fp32 matrices
    of a talker's qkv shape (4 x 16 MB: more than a 32 MB L3, so the weights stream from memory as in
    a frame). A few milliseconds in all."""
    from engine.models.cpu_linear import make_projection

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        # Input-major, as pack_linears stores a wide fp32 matrix (its faster one-row layout).
        projections = [make_projection(torch.randn(in_features, out_features, generator=gen).t(), weights)
                       for _ in range(matrices)]
        x = torch.randn(1, in_features, generator=gen)
        for p in projections:
            p(x)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for p in projections:
                p(x)
            best = min(best, (time.perf_counter() - t0) / matrices)
        return best * 1e6
    finally:
        torch.set_num_threads(threads)


def plan_weights(device: torch.device, dtype: torch.dtype | None, requested: str | None = None) -> WeightPlan:
    """The weight format for a model loaded on ``device``; ``dtype`` is the explicit compute dtype if any,
    ``requested`` an explicit format ("auto" or None: decide here)."""
    requested = None if requested in (None, "auto") else requested
    if requested is not None and requested not in WEIGHT_FORMATS:
        raise ValueError(f"weights {requested!r}: expected auto or one of {', '.join(WEIGHT_FORMATS)}")
    if device.type != "cpu":
        fmt = requested or ("fp32" if dtype == torch.float32 else "bf16")
        why = "requested" if requested else "the compute dtype (bf16 unless --dtype float32)"
        return WeightPlan(fmt, device.type, "device", f"{device.type}: {why}")
    isa, source = detect_isa()
    if requested is not None:
        return WeightPlan(requested, isa, source, f"requested --weights {requested}")
    if dtype is not None:
        fmt = "fp32" if dtype == torch.float32 else "bf16"
        return WeightPlan(fmt, isa, source, f"requested --dtype {str(dtype).removeprefix('torch.')}")
    if isa == "amx":
        return WeightPlan("bf16", isa, source, "AMX-BF16: native bf16 tiles, half the bytes of fp32")
    if isa == "avx2":
        return WeightPlan("fp32", isa, source, "no native bf16 dot product (AVX2 only): bf16 would be emulated")
    if source == ISA_ENV:
        fmt = "bf16" if isa == "avx512_bf16" else "fp32"
        return WeightPlan(fmt, isa, source, f"forced {ISA_ENV}={isa}: flag rule, no timing")
    timings = {fmt: measure_gemv_us(fmt) for fmt in ("fp32", "bf16")}
    return plan_from_timings(isa, source, timings)


def plan_from_timings(isa: str, source: str, gemv_us: dict[str, float]) -> WeightPlan:
    speedup = gemv_us["fp32"] / gemv_us["bf16"]
    fmt = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return WeightPlan(fmt, isa, source, f"one-thread GEMV: bf16 {speedup:.2f}x fp32's speed "
                      f"(bf16 needs >= {BF16_MIN_SPEEDUP}x)", {k: round(v, 1) for k, v in gemv_us.items()})
