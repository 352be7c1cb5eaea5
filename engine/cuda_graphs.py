"""The decode part of a step as fixed-shape functions over static buffers, one pair per batch bucket:
``talker(b)`` (the talker's forward for one new row per slot) and ``frame(b)`` (codebook-0 logits and
draw, the code predictor's 15 sub-steps with their draws, the next talker input row). On CUDA each is
captured once into a CUDA graph and replayed; elsewhere the same function is called on the same
buffers, so the CPU tests run exactly what a GPU replays.

Why: a decode step is hundreds of small kernels (28 talker layers, then 15 x 5 predictor layers), and
at serving batch sizes launching them from Python costs more than running them.

How (the nano-vllm recipe): rows are slots (engine/step_buffers.py); a step over the requests in slots
``< n`` runs bucket ``b >= n``, and every row that is not active this step is harmless padding (KV
slot -1 writes nothing, context length 1 reads one cached position) whose results are masked out, so
its slot's state is kept. Shapes that Python decides at capture are fixed per bucket: the block-table
width (the longest sequence the engine admits), the predictor's cache length at each sub-step, and
the decode kernel's split count, which depends only on batch and table width
(kernels/decode_attention.py), never on the lengths in the tensors.

``bucketed=False`` (EngineConfig.cuda_graphs off) runs the same functions at the exact row count,
uncaptured: the eager baseline.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from engine.models.talker import Talker
from engine.paged_context import PagedContext, PagedKVCache
from engine.step_buffers import StepBuffers

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)

# (logits [b, V] fp32, b, invalid [b] bool) -> codebook-0 ids [b]; (logits, b, sub-step j, invalid) ->
# codebook j+1 ids [b]. Rows whose probabilities are not finite are or-ed into ``invalid``.
TalkerDraw = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
PredictorDraw = Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]


class StaticCall:
    """``fn`` over static buffers: captured into a CUDA graph on CUDA, plainly called elsewhere."""

    def __init__(self, fn: Callable[[], torch.Tensor], device: torch.device, pool: object | None,
                 capture: bool) -> None:
        self.fn, self.graph = fn, None
        if capture and device.type == "cuda":
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


class StaticDecode:
    def __init__(self, talker: Talker, kv: PagedKVCache, buffers: StepBuffers, draw_talker: TalkerDraw,
                 draw_predictor: PredictorDraw, bucketed: bool, capture_frame: bool) -> None:
        """``capture_frame``: the draws are fixed-shape device code that a graph may hold."""
        self.talker, self.kv, self.buf = talker, kv, buffers
        self.draw_talker, self.draw_predictor = draw_talker, draw_predictor
        self.device = buffers.device
        rows = buffers.rows
        self.buckets = [b for b in BUCKETS if b < rows] + [rows]
        self.bucketed = bucketed
        # Our own reference: the stack's RopeTable may grow (reallocate) later, the graphs keep this one.
        self.cos_sin = talker.model.rope.get(buffers.table_width * kv.block_size, self.device)
        self._talker: dict[int, StaticCall] = {}
        self._frame: dict[int, StaticCall] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.captured = bucketed and self.device.type == "cuda"  # replayed from CUDA graphs
        self._capture_frame = capture_frame
        if self.captured:
            with torch.inference_mode():
                for b in reversed(self.buckets):  # largest first: smaller graphs reuse its pool memory
                    self._call(self._talker, b, self._talker_fn, True)
                    self._call(self._frame, b, self._frame_fn, capture_frame)

    def rows_for(self, n: int) -> int:
        """The row count a step over slots ``0..n-1`` runs: its bucket, or ``n`` itself when eager."""
        return self.buckets[bisect.bisect_left(self.buckets, n)] if self.bucketed else n

    def _call(self, calls: dict[int, StaticCall], b: int, make: Callable[[int], Callable[[], torch.Tensor]],
              capture: bool) -> StaticCall:
        if b not in calls:
            calls[b] = StaticCall(make(b), self.device, self._pool, capture and self.captured)
        return calls[b]

    def talker_decode(self, b: int) -> None:
        """Rows ``0..b-1``: the talker's normed hidden state of each decoding slot's new row → ``buf.hidden``."""
        self._call(self._talker, b, self._talker_fn, True)()

    def frame(self, b: int) -> torch.Tensor:
        """Rows ``0..b-1``: a frame from each sampling slot's hidden state; its next talker input →
        ``buf.x_next``. Returns ``[b, 17]``: the 16 codes and a non-finite-probabilities flag (rows of slots
        that did not sample are meaningless)."""
        return self._call(self._frame, b, self._frame_fn, self._capture_frame)()

    def _talker_fn(self, b: int) -> Callable[[], torch.Tensor]:
        buf = self.buf
        ctx = PagedContext(cache=self.kv, cos_sin=self.cos_sin, eps=self.talker.cfg.transformer.rms_norm_eps,
                           positions=buf.positions.dev[:b], slot_mapping=buf.slot_mapping.dev[:b],
                           block_tables=buf.block_tables.dev[:b], context_lens=buf.context_lens.dev[:b],
                           cu_seqlens_q=None)

        def fn() -> torch.Tensor:
            out = self.talker.model(buf.x[:b], ctx)
            # Slots that only sample (their hidden state came from this step's prefill) keep theirs.
            buf.hidden[:b].copy_(torch.where(buf.decoding.dev[:b, None], out, buf.hidden[:b]))
            return buf.hidden[:b]

        return fn

    def _frame_fn(self, b: int) -> Callable[[], torch.Tensor]:
        buf, talker = self.buf, self.talker
        predictor = talker.code_predictor
        ctx = predictor.new_context(b)

        def fn() -> torch.Tensor:
            hidden = buf.hidden[:b]
            invalid = torch.zeros(b, dtype=torch.bool, device=hidden.device)
            c0 = self.draw_talker(talker.logits(hidden), b, invalid)
            x = torch.stack([hidden, talker.embed_codec(c0)], dim=1)  # [b, 2, talker_hidden]
            ctx.length = 0  # a frame-fresh predictor cache; the sub-steps' lengths are fixed by their order
            codes = [c0]
            for j in range(predictor.num_residual_codebooks):
                code = self.draw_predictor(predictor.step(x, ctx, head=j), b, j, invalid)
                codes.append(code)
                if j + 1 < predictor.num_residual_codebooks:
                    x = predictor.model.codec_embedding[j](code)[:, None]
            frame = torch.stack(codes, dim=1)  # [b, 16]
            # The next talker input: the frame's embedding plus the request's text row for that frame.
            buf.x_next[:b].copy_(talker.embed_frames(frame) + buf.trailing[:b])
            buf.codes[:b, :-1].copy_(frame)
            buf.codes[:b, -1].copy_(invalid)
            return buf.codes[:b]

        return fn
