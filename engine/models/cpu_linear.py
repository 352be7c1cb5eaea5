"""``F.linear(x, weight)`` for a fixed weight, in the weight format ``engine.precision`` chose.

Three formats, one call signature (``projection(x, many_sequences)``):

- ``Projection`` (fp32 on CPU; the model's dtype elsewhere): the path whose full-size logits match
  the official code within 1e-5; unchanged by the bf16 and int8 paths below.
- ``Bf16Projection`` (CPU): bf16 weights reordered for oneDNN; activations are cast to bf16 at the
  input and the output goes back to the caller's dtype, so norms, attention and the KV cache stay in
  the model's dtype. One thread, AVX512-BF16 EPYC, 4096x1024, weights from memory: 267 µs against
  747 µs for the fp32 GEMV (31 against 22 GB/s, at half the bytes).
- ``Int8Projection`` (CPU and CUDA): int8 weights with one fp32-derived scale per output channel
  (symmetric, ``scale = max|w| / 127``); activations stay in a float dtype (bf16 on CPU: torch's int8
  kernel is 20x slower with fp32 activations). Where ``_weight_int8pack_mm`` has no kernel for the
  device, the weight is dequantised per call (slow, but it runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_BATCHED_ROWS = 128  # a decode step's rows: up to max_running sessions, x2 in a predictor's first sub-step


def _padded_rows(rows: int) -> int:
    """oneDNN builds and caches a kernel for every row count it sees; padding to a power of two (and
    to a multiple of 128 beyond 128) keeps that to a handful: unpadded, a 200-session soak grew the
    server's RSS by ~30 MB in cached kernels. The zero rows cost nothing in a step bound by reading
    the weights."""
    if rows <= MAX_BATCHED_ROWS:
        return 1 << (rows - 1).bit_length()
    return -(-rows // MAX_BATCHED_ROWS) * MAX_BATCHED_ROWS


def _onednn(flat: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    rows = flat.shape[0]
    padded = _padded_rows(rows)
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    return torch.ops.mkldnn._linear_pointwise(flat, packed, None, "none", [], "")[:rows]


class Projection:
    """fp32 on CPU (or the model's dtype on CUDA), on the CPU path that suits the batch.

    On CPU (measured on this project's AMD EPYC, AVX-512, one thread, fp32): one sequence's rows go
    through MKL with the weight in the layout ``pack_linears`` chose — one row is a matrix-vector
    product bound by memory bandwidth (19-22 GB/s), and this path keeps the official code's summation
    order closely enough for full-size logits within 1e-5 of it. Rows of several sequences (a batched
    engine step) go through oneDNN with the weight reordered for small batches: about 2x faster (14-15
    GB/s at 8 rows, against 6-9 through MKL), with other rounding, which only batched steps see. The
    reordered copy doubles the weights' memory, on CPU only. Elsewhere (CUDA) it is plain ``F.linear``.
    """

    weights = "fp32"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.batched: torch.Tensor | None = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            self.batched = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 8)

    def __call__(self, x: torch.Tensor, many_sequences: bool = False) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not many_sequences or self.batched is None or rows > MAX_BATCHED_ROWS:
            return F.linear(x, self.weight)  # (and prefill chunks: MKL is as fast once rows are many)
        out = _onednn(x.reshape(rows, x.shape[-1]), self.batched)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class Bf16Projection:
    """bf16 weights on CPU through oneDNN: one copy reordered for one row (a batch-1 decode step), one
    for several (batched steps, the predictor's 2-row first sub-step, prefill). Both are bf16, so the
    two together take the memory of one fp32 copy."""

    weights = "bf16"

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.device.type != "cpu":
            raise ValueError("Bf16Projection is the CPU path; on CUDA the model's dtype is bf16 already")
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.out_features = w.shape[0]
        self.single = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        self.batched = torch.ops.mkldnn._reorder_linear_weight(w, 8)

    def __call__(self, x: torch.Tensor, many_sequences: bool = False) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1]).to(torch.bfloat16)
        if rows == 1:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.single, None, "none", [], "")
        else:
            out = _onednn(flat, self.batched)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scale [out] fp32) with ``w ≈ q * scale``.
    The rounding error of each weight is at most half a step, ``scale / 2``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Projection:
    """int8 weights, per-channel scales, activations in ``act_dtype`` (bf16 on CPU, the model's dtype
    on CUDA); the output comes back in the caller's dtype."""

    weights = "int8"

    def __init__(self, weight: torch.Tensor, act_dtype: torch.dtype | None = None) -> None:
        self.q, scale = quantize_int8(weight)
        on_cpu = weight.device.type == "cpu"
        self.act_dtype = act_dtype or (torch.bfloat16 if on_cpu else weight.dtype)
        self.scale = scale.to(self.act_dtype)
        self.fused = self._kernel_runs()

    def _kernel_runs(self) -> bool:
        try:
            x = torch.zeros(1, self.q.shape[1], dtype=self.act_dtype, device=self.q.device)
            torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
            return True
        except (RuntimeError, NotImplementedError):  # no kernel for this device / dtype
            return False

    def __call__(self, x: torch.Tensor, many_sequences: bool = False) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1]).to(self.act_dtype)
        if self.fused:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)
        else:
            out = F.linear(flat, self.q.to(self.act_dtype)) * self.scale
        return out.to(x.dtype).reshape(*x.shape[:-1], self.q.shape[0])


AnyProjection = Projection | Bf16Projection | Int8Projection


def make_projection(weight: torch.Tensor, weights: str = "fp32") -> AnyProjection:
    """The projection for ``weight`` in format ``weights`` (``engine.precision.WEIGHT_FORMATS``). bf16
    off CPU is the model's own dtype, hence the plain ``Projection``."""
    if weights == "int8":
        return Int8Projection(weight)
    if weights == "bf16" and weight.device.type == "cpu":
        return Bf16Projection(weight)
    if weights in ("fp32", "bf16"):
        return Projection(weight)
    raise ValueError(f"unknown weight format {weights!r}")
