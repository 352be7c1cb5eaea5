"""The decode step replayed from CUDA graphs: the talker's forward for a batch of decodes, and each of
the code predictor's 15 sub-steps, captured once per batch-size bucket.

Why: a decode step is hundreds of small kernels (28 talker layers, then 15 x 5 predictor layers), and
at serving batch sizes launching them from Python costs more than running them. A graph replays the
whole sequence with one launch.

How (the nano-vllm recipe): every input lives in a static buffer sized for the largest bucket; a step
of ``n`` sequences copies its inputs into the first ``n`` rows, pads the bucket's remaining rows so they
are harmless (KV slot -1 writes nothing, context length 1 reads one cached position), replays the
bucket's graph and reads the first ``n`` rows of its static output. Shapes that Python decides at
capture are fixed per graph: the block-table width (the longest sequence the engine admits), the
predictor's cache length at each sub-step, and the decode kernel's split count, which depends only on
batch and table width (kernels/decode_attention.py), never on the lengths in the tensors.

Steps with prefill rows, and batches above the largest bucket, run eagerly. Off CUDA a "graph" is the
same function called on the same static buffers, so the padding and copying logic is tested on CPU.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from engine.models.qwen3 import ContiguousContext
from engine.models.talker import Talker
from engine.paged_context import PagedContext, PagedKVCache

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class StaticCall:
    """``fn`` over static buffers: captured into a CUDA graph on CUDA, plainly called elsewhere."""

    def __init__(self, fn: Callable[[], torch.Tensor], device: torch.device, pool: object | None) -> None:
        self.fn, self.graph = fn, None
        if device.type == "cuda":
            fn()  # warm-up outside capture: Triton compiles and cuBLAS picks its kernels here
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = fn()

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


class DecodeGraphs:
    def __init__(self, talker: Talker, kv: PagedKVCache, max_batch: int, max_sequence_len: int) -> None:
        self.talker, self.kv = talker, kv
        device, dtype = talker.model.norm.weight.device, talker.model.norm.weight.dtype
        hidden = talker.cfg.transformer.hidden_size
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch = max_batch
        width = -(-max_sequence_len // kv.block_size)
        self.x = torch.zeros(max_batch, hidden, dtype=dtype, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(max_batch, width, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        # Our own reference: the stack's RopeTable may grow (reallocate) later, the graphs keep this one.
        self.cos_sin = talker.model.rope.get(width * kv.block_size, device)
        predictor = talker.code_predictor
        self.pred_first = torch.zeros(max_batch, 2, hidden, dtype=dtype, device=device)  # [h, embed(c0)]
        self.pred_next = torch.zeros(max_batch, 1, hidden, dtype=dtype, device=device)  # embed(previous code)
        self._talker: dict[int, StaticCall] = {}
        self._predictor: dict[tuple[int, int], StaticCall] = {}
        pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        with torch.inference_mode():
            for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
                self._talker[b] = StaticCall(self._talker_fn(b), device, pool)
                ctx = predictor.new_context(b)
                for j in range(predictor.num_residual_codebooks):
                    self._predictor[b, j] = StaticCall(self._predictor_fn(b, j, ctx), device, pool)

    def fits(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def _bucket(self, batch: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, batch)]

    # ---- talker ------------------------------------------------------------------------------
    def _talker_fn(self, b: int) -> Callable[[], torch.Tensor]:
        ctx = PagedContext(cache=self.kv, cos_sin=self.cos_sin, eps=self.talker.cfg.transformer.rms_norm_eps,
                           positions=self.positions[:b], slot_mapping=self.slots[:b],
                           block_tables=self.block_tables[:b], context_lens=self.context_lens[:b], cu_seqlens_q=None)
        return lambda: self.talker.model(self.x[:b], ctx)

    def talker_decode(self, x: torch.Tensor, ctx: PagedContext) -> torch.Tensor:
        """The talker's normed hidden states for one new row per sequence, as ``talker.model(x, ctx)``."""
        n, b = x.shape[0], self._bucket(x.shape[0])
        width = ctx.block_tables.shape[1]  # at most the static width: the engine caps sequences at max_sequence_len
        self.x[:n] = x
        self.positions[:n] = ctx.positions
        self.slots[:n] = ctx.slot_mapping
        self.slots[n:b] = -1
        self.block_tables[:n, :width] = ctx.block_tables
        self.context_lens[:n] = ctx.context_lens
        self.context_lens[n:b] = 1
        return self._talker[b]()[:n]

    # ---- code predictor ----------------------------------------------------------------------
    def _predictor_fn(self, b: int, j: int, ctx: ContiguousContext) -> Callable[[], torch.Tensor]:
        predictor = self.talker.code_predictor
        x = self.pred_first[:b] if j == 0 else self.pred_next[:b]
        length = 0 if j == 0 else j + 1  # sub-step j continues a cache of h, c0, c1..c(j-1)

        def fn() -> torch.Tensor:
            ctx.length = length
            return predictor.step(x, ctx, head=j)

        return fn

    def predictor_substep(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """fp32 logits of codebook ``j + 1``, as ``predictor.step(x, ctx, head=j)`` on a frame-fresh cache
        fed sub-steps ``0..j-1`` in order (x: [n, 2, H] for j = 0, else [n, 1, H])."""
        n = x.shape[0]
        (self.pred_first if j == 0 else self.pred_next)[:n] = x
        return self._predictor[self._bucket(n), j]()[:n]
