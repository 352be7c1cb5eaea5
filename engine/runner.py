"""Runs one scheduled step on the device and reports what it computed; it changes no request (the
scheduler applies the ``StepOutput``: ``Scheduler.update_from_output``).

A step has two parts:
- the **prefill part**, when the plan has prompt chunks: one eager forward over every chunk's rows
  (paged attention over each request's cache). A request whose last prompt row went in leaves its
  hidden state in its slot, to sample its first frame below;
- the **decode part**, always through the fixed-shape functions of the step's batch bucket
  (engine/cuda_graphs.py, replayed from CUDA graphs on CUDA): the talker's forward for every decoding
  slot's one new row, then a frame for every slot that samples one (decodes and finished prefills).
A prefill never turns the decode rows eager: it only runs beside them.

Sampling runs inside the decode part, on the device (engine/device_sampling.py): per-slot parameters
and repetition masks, and noise keyed by (request seed, frame, codebook), so a request's draws do not
depend on its batch neighbours, and the step's only device→host copy is the codes at its end. The
draws do not equal the official code's token for token (greedy ones do); engine/generate.py keeps
the official draw order as the single-request reference.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.block_manager import BlockManager
from engine.cuda_graphs import StaticDecode
from engine.device_sampling import RowSampling, TalkerVocab, reset_seen_row, sample_predictor, sample_talker
from engine.models.talker import Talker
from engine.paged_context import PagedContext, PagedKVCache
from engine.request import RequestState
from engine.scheduler import Plan, ScheduledRequest, StepOutput
from engine.step_buffers import StepBuffers


class Runner:
    def __init__(self, talker: Talker, kv: PagedKVCache, blocks: BlockManager, max_running: int,
                 max_sequence_len: int, max_batched_tokens: int, static_graphs: bool = True) -> None:
        """``static_graphs``: decode rows run in their bucket (replayed from CUDA graphs on CUDA); off, the
        same functions run at the exact row count, uncaptured (the eager baseline)."""
        self.talker, self.kv, self.blocks = talker, kv, blocks
        tcfg = talker.cfg
        self.eos = tcfg.codec.eos
        self.device = talker.codec_head.weight.device
        width = -(-max_sequence_len // kv.block_size)
        vocab = tcfg.transformer.vocab_size
        self.buf = StepBuffers(max_running, tcfg.transformer.hidden_size, tcfg.num_code_groups, vocab, width,
                               max_batched_tokens, talker.model.norm.weight.dtype, self.device)
        self.sampling = RowSampling.allocate(max_running, self.device)
        self.vocab = TalkerVocab.build(vocab, self.eos, self.device)
        self.decode = StaticDecode(talker, kv, self.buf, self._draw_talker, self._draw_predictor,
                                   bucketed=static_graphs, capture_frame=True)
        self.path = "static" if static_graphs else "eager"
        # Cumulative seconds per phase (what `bench engine` reports as the step split). On CUDA only the
        # codes copy waits for the device, so there the frame phase carries the time of the whole step.
        self.timings = {"prefill_s": 0.0, "talker_s": 0.0, "predictor_s": 0.0, "sample_s": 0.0}
        self.counters = {"decode_rows{path=static}": 0, "decode_rows{path=eager}": 0, "prefill_rows": 0,
                         "host_syncs": 0}

    @torch.inference_mode()
    def step(self, plan: Plan) -> StepOutput:
        buf = self.buf
        buf.begin()
        for it in plan.decodes + plan.prefills:
            st = it.state
            if buf.claim(st.slot, st, st.preemptions):  # a new occupant: its sampling rows and mask
                self.sampling.set_row(st.slot, st.sampling, seed=st.seed)
                reset_seen_row(buf.seen, st.slot, st.history)
            buf.write_table(st.slot, self.blocks.table(st.request_id).blocks)
        t0 = time.perf_counter()
        done = [it for it in plan.prefills if it.start + it.num_rows >= it.state.num_rows]
        if plan.prefills:
            self._prefill(plan.prefills, done)
        t1 = time.perf_counter()
        self.timings["prefill_s"] += t1 - t0
        sampled = [it.state for it in plan.decodes + done]
        if not sampled:
            buf.end()
            self.counters["prefill_rows"] += sum(it.num_rows for it in plan.prefills)
            return StepOutput()
        b = self.decode.rows_for(1 + max(st.slot for st in sampled))
        self._write_decode_inputs(plan.decodes, sampled, b)
        if plan.decodes:
            self.decode.talker_decode(b)
        t2 = time.perf_counter()
        self.timings["talker_s"] += t2 - t1
        codes = self.decode.frame(b).cpu().numpy()  # the step's one device→host copy
        self.counters["host_syncs"] += 1
        t3 = time.perf_counter()
        self.timings["predictor_s"] += t3 - t2
        bad = [st.request_id for st in sampled if codes[st.slot, -1]]
        if bad:  # the engine retries the step's requests one by one: only these fail
            raise ValueError(f"non-finite sampling probabilities for {', '.join(bad)} (the model produced NaN or "
                             "inf logits)")
        # Only now, with the step known good, the next inputs replace the current ones: a failed step
        # changes nothing (K/V rewrites are idempotent), so its requests can be retried one by one.
        index = buf.index.dev[:len(sampled)]  # the sampled slots, uploaded by _write_decode_inputs
        next_rows = buf.x_next.index_select(0, index)
        buf.x.index_copy_(0, index, next_rows)
        output = StepOutput(sampled=sampled, next_rows=next_rows)
        for st in sampled:
            row = codes[st.slot, :-1]
            output.frames.append(None if row[0] == self.eos else row.tolist())
        self.counters[f"decode_rows{{path={self.path}}}"] += len(plan.decodes)
        self.counters["prefill_rows"] += sum(it.num_rows for it in plan.prefills)
        self.timings["sample_s"] += time.perf_counter() - t3
        return output

    def _prefill(self, prefills: list[ScheduledRequest], done: list[ScheduledRequest]) -> None:
        """The prompt chunks, eagerly; the last row's hidden state of each finished prompt → its slot."""
        buf, bs = self.buf, self.kv.block_size
        x = torch.cat([it.state.pending_rows[it.start:it.start + it.num_rows] for it in prefills])
        total, n = 0, len(prefills)
        cu, last = buf.pf_cu_seqlens.np, []
        cu[0] = 0
        for i, it in enumerate(prefills):
            slot, pos = it.state.slot, np.arange(it.start, it.start + it.num_rows)
            buf.pf_positions.np[total:total + it.num_rows] = pos
            buf.pf_slot_mapping.np[total:total + it.num_rows] = buf.kv_slot(slot, pos, bs)
            buf.pf_context_lens.np[i] = it.start + it.num_rows
            buf.pf_slots.np[i] = slot
            total += it.num_rows
            cu[i + 1] = total
            if it in done:
                last.append(total - 1)
        slots = buf.pf_slots.upload(n)
        ctx = PagedContext(cache=self.kv, cos_sin=self.decode.cos_sin, eps=self.talker.cfg.transformer.rms_norm_eps,
                           positions=buf.pf_positions.upload(total), slot_mapping=buf.pf_slot_mapping.upload(total),
                           block_tables=buf.block_tables.dev.index_select(0, slots),
                           context_lens=buf.pf_context_lens.upload(n), cu_seqlens_q=buf.pf_cu_seqlens.upload(n + 1))
        out = self.talker.model(x, ctx)
        if done:
            buf.pf_last.np[:len(last)] = last
            buf.pf_done.np[:len(done)] = [it.state.slot for it in done]
            buf.hidden.index_copy_(0, buf.pf_done.upload(len(done)), out.index_select(0, buf.pf_last.upload(len(last))))

    def _write_decode_inputs(self, decodes: list[ScheduledRequest], sampled: list[RequestState], b: int) -> None:
        """Rows ``0..b-1``: every row padding, then the decoding and sampling slots filled in."""
        buf, bs = self.buf, self.kv.block_size
        buf.positions.np[:b] = 0
        buf.slot_mapping.np[:b] = -1
        buf.context_lens.np[:b] = 1
        buf.decoding.np[:b] = False
        buf.sampling.np[:b] = False
        for it in decodes:
            slot = it.state.slot
            buf.positions.np[slot] = it.start
            buf.slot_mapping.np[slot] = buf.kv_slot(slot, it.start, bs)
            buf.context_lens.np[slot] = it.start + 1
            buf.decoding.np[slot] = True
        for i, st in enumerate(sampled):
            buf.sampling.np[st.slot] = True
            buf.index.np[i] = st.slot
            buf.num_frames.np[st.slot] = len(st.frames)
            buf.prev_c0.np[st.slot] = st.frames[-1][0] if st.frames else -1
        buf.upload_decode(b)
        index = buf.index.upload(len(sampled))
        # Each sampled slot's text row for the frame it samples now (it joins that frame's embedding).
        buf.trailing.index_copy_(0, index, torch.stack([st.trailing_row(len(st.frames)) for st in sampled]))

    # ---- draws (inside the frame function: device ops on the slot buffers, no host synchronisation) ----
    def _draw_talker(self, logits: torch.Tensor, b: int, invalid: torch.Tensor) -> torch.Tensor:
        buf = self.buf
        seen, prev = buf.seen[:b], buf.prev_c0.dev[:b]
        # The previous frame's codebook-0 id joins the repetition mask now, not when it was drawn: a retried
        # step marks the same id again, so the mask never holds a draw that was not kept.
        at = prev.clamp(min=0)[:, None]
        seen.scatter_(1, at, seen.gather(1, at) | ((prev >= 0) & buf.sampling.dev[:b])[:, None])
        return sample_talker(logits, self.sampling[:b], seen, buf.num_frames.dev[:b], self.vocab, invalid)

    def _draw_predictor(self, logits: torch.Tensor, b: int, j: int, invalid: torch.Tensor) -> torch.Tensor:
        return sample_predictor(logits, self.sampling[:b], self.buf.num_frames.dev[:b], j + 1, invalid)
