"""Runs one scheduled step on the device: a batched talker forward over paged KV, codebook-0
sampling per request, and the code predictor's 15 sub-steps batched across every request that
produced a frame this step.

Batch invariance: every request samples from its own generator in a fixed order (talker draw,
then 15 predictor draws), so its codes do not depend on who else is in the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.cuda_graphs import DecodeGraphs
from engine.models.talker import Talker
from engine.paged_context import PagedContext, PagedKVCache
from engine.request import RequestState
from engine.sampling import TalkerLogitsProcessor, draw_rows, predictor_rule, talker_rule
from engine.scheduler import Plan


@dataclass
class FrameOutput:
    state: RequestState
    frame: list[int] | None  # None: the request sampled EOS
    last: bool  # no further frame will follow (EOS or the frame cap)


class Runner:
    def __init__(self, talker: Talker, kv: PagedKVCache, blocks: BlockManager,
                 graphs: DecodeGraphs | None = None) -> None:
        self.talker, self.kv, self.blocks, self.graphs = talker, kv, blocks, graphs
        tcfg = talker.cfg
        self.process = TalkerLogitsProcessor(tcfg.transformer.vocab_size, tcfg.codec.eos)
        self.eos = tcfg.codec.eos
        self.device = talker.codec_head.weight.device
        self.rope = talker.model.rope
        # Cumulative seconds per phase (what `bench engine` reports as the step split).
        self.timings = {"prefill_s": 0.0, "talker_s": 0.0, "predictor_s": 0.0, "sample_s": 0.0}

    # ---- talker ------------------------------------------------------------------------------
    def _talker_batch(self, plan: Plan) -> tuple[torch.Tensor, PagedContext]:
        rows, positions, slots, tables, ctx_lens, q_lens = [], [], [], [], [], []
        bs = self.kv.block_size
        for it in plan.decodes:
            rows.append(it.state.next_row[None])
        for it in plan.prefills:
            rows.append(it.state.pending_rows[it.state.num_computed:it.state.num_computed + it.num_rows])
        for it in plan.decodes + plan.prefills:
            st = it.state
            table = self.blocks.table(st.request_id).blocks
            pos = torch.arange(it.start, it.start + it.num_rows)
            positions.append(pos)
            blocks = torch.tensor(table, dtype=torch.long)
            slots.append(blocks[pos // bs] * bs + pos % bs)
            tables.append(table)
            ctx_lens.append(it.start + it.num_rows)
            q_lens.append(it.num_rows)
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        positions_t = torch.cat(positions)
        ctx = PagedContext(
            cache=self.kv, cos_sin=self.rope.get(int(max(ctx_lens)), self.device),
            eps=self.talker.cfg.transformer.rms_norm_eps, positions=positions_t.to(self.device),
            slot_mapping=torch.cat(slots).to(self.device), block_tables=block_tables.to(self.device),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=self.device),
            cu_seqlens_q=None if not plan.prefills else torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()],
                                                                dtype=torch.int32, device=self.device))
        return torch.cat(rows), ctx

    @torch.inference_mode()
    def step(self, plan: Plan) -> list[FrameOutput]:
        items = plan.decodes + plan.prefills
        t0 = time.perf_counter()
        x, ctx = self._talker_batch(plan)
        if self.graphs is not None and not plan.prefills and self.graphs.fits(len(plan.decodes)):
            hidden = self.graphs.talker_decode(x, ctx)
        else:
            hidden = self.talker.model(x, ctx)
        self._sync()
        # A step with prefill rows is charged to prefill: that is the cost new arrivals add.
        self.timings["prefill_s" if plan.prefills else "talker_s"] += time.perf_counter() - t0
        # The last row of each sequence; only sequences whose rows are all consumed sample a frame.
        ends = torch.tensor([it.num_rows for it in items]).cumsum(0) - 1
        ready_states, ready_rows = [], []
        for index, (it, end) in enumerate(zip(items, ends.tolist(), strict=True)):
            st = it.state
            if index >= len(plan.decodes) and st.num_computed + it.num_rows < st.num_rows:
                continue  # a prefill chunk: a frame only once the whole prompt is in
            ready_states.append(st)
            ready_rows.append(end)
        # A failed step leaves its requests as they were (K/V rewrites are idempotent), so the
        # engine can retry them one by one to find the culprit: samplers are restored, and prefill
        # progress is only counted once the step has succeeded.
        snapshots = [(st, st.generator.get_state()) for st in ready_states if st.generator is not None]
        try:
            outputs = self._sample_frames(ready_states, hidden[ready_rows]) if ready_states else []
        except BaseException:
            for st, rng in snapshots:
                st.generator.set_state(rng)
            raise
        for it in plan.prefills:
            it.state.num_computed += it.num_rows
        return outputs

    def _sync(self) -> None:
        # CUDA runs ahead of Python: without a sync the phase timings would measure launches only.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- frames ------------------------------------------------------------------------------
    def _sample_frames(self, states: list[RequestState], hidden: torch.Tensor) -> list[FrameOutput]:
        t0 = time.perf_counter()
        logits = self.talker.logits(hidden)  # [B, vocab] fp32
        histories = [st.history for st in states]
        logits = self.process(logits, histories, [st.sampling for st in states])
        drawn = draw_rows(logits, [talker_rule(st.sampling) for st in states], [st.generator for st in states])
        outputs: list[FrameOutput] = []
        keep_states, keep_rows = [], []
        for i, (st, c0) in enumerate(zip(states, drawn.tolist(), strict=True)):
            if c0 == self.eos:
                outputs.append(FrameOutput(st, None, last=True))
                continue
            keep_states.append(st)
            keep_rows.append(i)
        t1 = time.perf_counter()
        self.timings["sample_s"] += t1 - t0
        if not keep_states:
            return outputs
        c0 = drawn[keep_rows]
        codes = self._predict_residual(keep_states, hidden[keep_rows], c0)
        self._sync()
        self.timings["predictor_s"] += time.perf_counter() - t1
        frames = torch.cat([c0[:, None], codes], dim=1)  # [B, 16]
        # The next talker input of each request is its frame's embedding plus its text row for that frame
        # (added by the request, since a live text may not have that row yet).
        for st, frame, embedding in zip(keep_states, frames.tolist(), self.talker.embed_frames(frames), strict=True):
            st.add_frame(frame, embedding)
            outputs.append(FrameOutput(st, frame, last=len(st.frames) >= st.max_frames))
        return outputs

    def _predict_residual(self, states: list[RequestState], hidden: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        """Codebooks 1..15 for B frames at once; each row drawn with its request's own sampler."""
        predictor = self.talker.code_predictor
        if self.graphs is not None and self.graphs.fits(len(states)):
            substep = self.graphs.predictor_substep
        else:
            ctx = predictor.new_context(batch=len(states))

            def substep(x: torch.Tensor, j: int) -> torch.Tensor:
                return predictor.step(x, ctx, head=j)
        x = torch.stack([hidden, self.talker.embed_codec(c0)], dim=1)  # [B, 2, talker_hidden]
        rules = [predictor_rule(st.sampling) for st in states]
        generators = [st.generator for st in states]
        columns = []
        for j in range(predictor.num_residual_codebooks):
            logits = substep(x, j)  # [B, vocab]
            codes = draw_rows(logits, rules, generators)
            columns.append(codes)
            if j + 1 < predictor.num_residual_codebooks:
                x = predictor.model.codec_embedding[j](codes)[:, None]
        return torch.stack(columns, dim=1)
