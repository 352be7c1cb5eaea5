"""Which requests run in the next step, and how many rows each feeds the talker.

Policy (vLLM V1 style, one step at a time):
1. Every decoding request gets one row; if the KV pool cannot hold it, the newest request of the
   lowest priority is preempted (blocks freed, recomputed later) until it fits.
2. The remaining token budget goes to prefill: requests already prefilling continue, then waiting
   requests are admitted in (priority, arrival) order while blocks and batch slots last. A long
   prompt is cut into chunks, so a new arrival never stalls running streams for more than one step.
3. After the step, ``update_from_output`` applies everything the step changed to the requests, in
   this one place: prefill progress, PREFILL → DECODE with the prefix commit, the new frame, the
   end of a request (EOS or its frame cap) and the release of its blocks and slot. The runner that
   computed the step changes no request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.api import StopReason
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import RequestState, Status


@dataclass
class ScheduledRequest:
    state: RequestState
    num_rows: int  # rows fed to the talker this step
    start: int  # index of the first of them in the request's sequence (= its cached length)


@dataclass
class Plan:
    decodes: list[ScheduledRequest] = field(default_factory=list)
    prefills: list[ScheduledRequest] = field(default_factory=list)
    out_of_memory: list[RequestState] = field(default_factory=list)  # alone and still cannot grow: fail them


@dataclass
class StepOutput:
    """What one step computed, for ``Scheduler.update_from_output``: the requests that sampled a frame
    (every decode, and each prefill whose last prompt row went in), in order, with their frames."""

    sampled: list[RequestState] = field(default_factory=list)
    frames: list[list[int] | None] = field(default_factory=list)  # 16 codes each; None: the request sampled EOS
    next_rows: torch.Tensor | None = None  # [len(sampled), hidden] talker input after each frame


@dataclass
class Emitted:
    """One request's result of a step, for the engine to hand on (codec, consumer)."""

    state: RequestState
    frame: list[int] | None  # None: it sampled EOS (no frame)
    finished: StopReason | None  # EOS or MAX_FRAMES when this was its last step


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.cfg, self.blocks = cfg, blocks
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []  # PREFILL or DECODE, holding blocks
        self.preemptions = 0
        self.prefix_rows_reused = 0  # prompt rows whose K/V came from the prefix cache
        self.free_slots = list(range(cfg.max_running - 1, -1, -1))  # lowest first: decode buckets stay small

    def add(self, state: RequestState) -> None:
        self.waiting.append(state)

    def remove(self, state: RequestState) -> None:
        """Finished, cancelled or failed: forget it and free its blocks and slot at once."""
        if state in self.running:
            self.running.remove(state)
        if state in self.waiting:
            self.waiting.remove(state)
        self.blocks.free_request(state.request_id)
        self._release_slot(state)

    def _release_slot(self, state: RequestState) -> None:
        if state.slot is not None:
            self.free_slots.append(state.slot)
            self.free_slots.sort(reverse=True)
            state.slot = None

    def _preempt_one(self, protect: RequestState) -> RequestState | None:
        victims = [r for r in self.running if r is not protect]
        if not victims:
            return None
        victim = max(victims, key=lambda r: (r.priority, r.arrival))  # lowest priority, newest
        self.running.remove(victim)
        self.blocks.free_request(victim.request_id)
        self._release_slot(victim)
        victim.preempt()
        self.preemptions += 1
        self.waiting.append(victim)
        return victim

    def schedule(self, paused: set[str] = frozenset()) -> Plan:
        """``paused``: requests whose consumer is behind; they keep their blocks but skip this step."""
        plan = Plan()
        # 1. decodes, oldest first so preemption hits the newest
        # A live request waiting for its next text row is skipped like a paused one: it keeps its blocks.
        decoding = [r for r in self.running if r.status == Status.DECODE and r.request_id not in paused
                    and r.may_sample]
        for state in sorted(decoding, key=lambda r: r.arrival):
            if state not in self.running:
                continue  # preempted while making room for an older request
            while not self.blocks.can_append(state.request_id):
                victim = self._preempt_one(protect=state)
                if victim is None:
                    break
                plan.decodes = [d for d in plan.decodes if d.state is not victim]
            if not self.blocks.can_append(state.request_id):
                self.remove(state)  # nothing left to preempt: the pool cannot hold this request
                plan.out_of_memory.append(state)
                continue
            start = self.blocks.table(state.request_id).num_tokens
            self.blocks.append_slot(state.request_id)
            plan.decodes.append(ScheduledRequest(state, 1, start))
        budget = self.cfg.max_batched_tokens - len(plan.decodes)

        # 2. prefills in progress, then admissions
        for state in [r for r in self.running if r.status == Status.PREFILL]:
            if budget <= 0:
                break
            n = min(budget, state.rows_ready - state.num_computed)
            if n <= 0:
                continue  # a live prompt waiting for text
            plan.prefills.append(ScheduledRequest(state, n, state.num_computed))
            budget -= n
        self.waiting.sort(key=lambda r: (r.priority, r.arrival))
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_running:
            state = self.waiting[0]
            hashes = state.prefix_block_hashes(self.blocks.block_size)
            if not self.blocks.can_allocate(state.num_rows, hashes):
                break  # keep priority order: nothing jumps the queue
            self.waiting.pop(0)
            cached = self.blocks.allocate(state.request_id, state.num_rows, hashes)
            self.prefix_rows_reused += cached
            state.num_computed = cached
            state.status = Status.PREFILL
            state.slot = self.free_slots.pop()  # one is free: running is below max_running
            self.running.append(state)
            n = min(budget, state.rows_ready - cached)
            if n > 0:  # a readmitted live request may still wait for text; it holds its blocks meanwhile
                plan.prefills.append(ScheduledRequest(state, n, cached))
                budget -= n
        return plan

    def update_from_output(self, plan: Plan, output: StepOutput) -> list[Emitted]:
        """Apply a completed step to its requests (the only place a step changes them)."""
        for it in plan.prefills:
            state = it.state
            state.num_computed += it.num_rows
            if state.num_computed >= state.num_rows:
                self.blocks.commit_prefix(state.request_id)  # its prompt K/V are written: shareable now
                state.status = Status.DECODE
        emitted: list[Emitted] = []
        for i, (state, frame) in enumerate(zip(output.sampled, output.frames, strict=True)):
            if frame is None:
                self.retire(state)
                emitted.append(Emitted(state, None, StopReason.EOS))
                continue
            state.frames.append(frame)
            state.frame_rows.append(output.next_rows[i])  # kept to recompute the sequence after a preemption
            state.pending_rows = None
            last = len(state.frames) >= state.max_frames
            if last:
                self.retire(state)
            emitted.append(Emitted(state, frame, StopReason.MAX_FRAMES if last else None))
        return emitted

    def add_text(self, state: RequestState, ids: list[int], max_frames: int | None = None) -> None:
        """A live request's text grew by ``ids``; ``max_frames``: its text has ended, with this frame cap.
        Its prompt gains the rows the text makes known, and a waiting step may run (``rows_ready``,
        ``may_sample``)."""
        state.prompt.extend(ids)
        if max_frames is not None:
            state.prompt.end()
            state.max_frames = max_frames
        state.feed_text()

    def retire(self, state: RequestState) -> None:
        """It ends (its last frame is out, or it was cancelled or failed): blocks and slot free now,
        before the next step."""
        self.remove(state)
        state.status = Status.FINISHED
