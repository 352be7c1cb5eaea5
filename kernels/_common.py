"""Small helpers shared by the kernel files: launch settings and interpreter quirks.

Nothing here touches the Triton driver at import time, so ``import kernels`` works on machines with
no GPU (the driver raises "0 active drivers" there unless ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
import triton

# Dtypes every kernel accepts. bf16 runs on a GPU; under the interpreter its arithmetic is wrong
# (values are kept as raw uint16), so CPU tests use fp32 and fp16.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

P = ParamSpec("P")
R = TypeVar("R")


# ``@triton.jit`` reads TRITON_INTERPRET when it decorates, i.e. when the kernel modules are imported
# (they all import this module first), so this snapshot says how every kernel here was built.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_triton_device(*tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; CPU tensors need kernels built by the interpreter."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(
                f"Triton kernel launched on a {t.device.type} tensor, but kernels was imported without "
                "TRITON_INTERPRET=1. Use the public op or the *_reference function on CPU, or set "
                "TRITON_INTERPRET=1 before kernels is first imported to run the Triton interpreter."
            )


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


def row_num_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: enough threads to cover the row in ~8-element chunks."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 tests want exact IEEE products; the GPU default for fp32 ``tl.dot`` is TF32 (10-bit mantissa)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_upcast(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16 ``tl.dot`` on raw bits; upcasting the operands keeps it honest there."""
    return INTERPRETED and dtype == torch.bfloat16


_sm_count_cache: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a fixed stand-in for the interpreter so tests are stable."""
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count_cache:
        _sm_count_cache[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count_cache[index]


def eager_reference_on_cpu(op: Callable[P, R], reference: Callable[P, R]) -> Callable[P, R]:
    """The public entry point of a custom op: ``op`` for CUDA tensors (by the first argument) and under
    ``torch.compile``; ``reference`` called directly for anything else in eager mode.

    Why: on CPU the custom-op dispatch (schema checks, the dispatcher, the Python kernel lookup) cost
    13 µs per call for an add+RMSNorm of one token and 70 µs for q/k norm + RoPE (torch 2.13, this
    project's CPU), more than the reference itself, and a batch-1 CPU frame calls these ops ~400
    times. Through ``op`` they stay one opaque node for the compiler and CUDA graphs.
    """

    def entry(*args: P.args, **kwargs: P.kwargs) -> R:
        if args[0].is_cuda or torch.compiler.is_compiling():
            return op(*args, **kwargs)
        return reference(*args, **kwargs)

    functools.update_wrapper(entry, reference)  # the reference's signature and annotations
    entry.__name__ = entry.__qualname__ = reference.__name__.removesuffix("_reference")
    return entry
