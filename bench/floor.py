"""The memory-bandwidth floor of one generated frame at batch 1.

At batch 1 every weight matrix is read once per use and the arithmetic is a matrix-vector
product, so a frame cannot be faster than (bytes of weights read per frame) / (the bandwidth a
GEMV achieves on weights that do not fit in cache). Per frame the talker stack and its codec
head are read once, the code predictor stack 15 times, plus one predictor head per sub-step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine.config import ModelConfig, TransformerConfig


def _stack_params(t: TransformerConfig) -> int:
    attn = t.hidden_size * t.head_dim * (2 * t.num_heads + 2 * t.num_kv_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    norms = 2 * t.hidden_size + 2 * t.head_dim
    return t.num_layers * (attn + mlp + norms) + t.hidden_size


def weights_read_per_frame(cfg: ModelConfig, bytes_per_weight: int = 4) -> int:
    talker, predictor = cfg.talker.transformer, cfg.code_predictor.transformer
    steps = cfg.code_predictor.num_code_groups - 1
    talker_elems = _stack_params(talker) + talker.hidden_size * talker.vocab_size
    predictor_elems = steps * (_stack_params(predictor) + predictor.hidden_size * predictor.vocab_size)
    return (talker_elems + predictor_elems) * bytes_per_weight


def gemv_bandwidth(megabytes: int = 512, repeats: int = 20) -> float:
    """Bytes/s of the faster of the two fp32 matrix-vector layouts (``W @ x`` and ``x @ W``) on a
    matrix (default 512 MB) far larger than any cache: the best a batch-1 frame could stream weights."""
    cols = 4096
    rows = megabytes * 2**20 // (4 * cols)
    w = torch.randn(rows, cols)
    x_cols, x_rows = torch.randn(cols), torch.randn(rows)
    best = float("inf")
    for product in (lambda: torch.mv(w, x_cols), lambda: x_rows @ w):
        for _ in range(3):
            product()
        for _ in range(repeats):
            t0 = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t0)
    return w.numel() * 4 / best


def floor_seconds_per_frame(cfg: ModelConfig, bandwidth: float | None = None, bytes_per_weight: int = 4) -> dict:
    """The floor for weights of ``bytes_per_weight`` bytes (4 fp32, 2 bf16, 1 int8) streamed at the
    fp32 GEMV's bandwidth: what the hardware allows for those bytes, whatever kernel reads them."""
    bw = bandwidth or gemv_bandwidth()
    nbytes = weights_read_per_frame(cfg, bytes_per_weight)
    return {"weights_read_per_frame_gb": nbytes / 1e9, "gemv_gb_per_s": bw / 1e9, "floor_s_per_frame": nbytes / bw,
            "bytes_per_weight": bytes_per_weight, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (only its config is read)")
    args = ap.parse_args()
    print(json.dumps(floor_seconds_per_frame(ModelConfig.from_dir(args.model)), indent=2))


if __name__ == "__main__":
    main()
