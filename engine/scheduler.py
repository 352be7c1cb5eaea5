"""Which requests run in the next step, and how many rows each feeds the talker.

Policy (vLLM V1 style, one step at a time):
1. Every decoding request gets one row; if the KV pool cannot hold it, the newest request of the
   lowest priority is preempted (blocks freed, recomputed later) until it fits.
2. The remaining token budget goes to prefill: requests already prefilling continue, then waiting
   requests are admitted in (priority, arrival) order while blocks and batch slots last. A long
   prompt is cut into chunks, so a new arrival never stalls running streams for more than one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    preempted: list[RequestState] = field(default_factory=list)
    out_of_memory: list[RequestState] = field(default_factory=list)  # alone and still cannot grow: fail them

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills and not self.out_of_memory


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager) -> None:
        self.cfg, self.blocks = cfg, blocks
        self.waiting: list[RequestState] = []
        self.running: list[RequestState] = []  # PREFILL or DECODE, holding blocks
        self.preemptions = 0
        self.prefix_rows_reused = 0  # prompt rows whose K/V came from the prefix cache

    def add(self, state: RequestState) -> None:
        self.waiting.append(state)

    def remove(self, state: RequestState) -> None:
        """Finished, cancelled or failed: forget it and free its blocks at once."""
        if state in self.running:
            self.running.remove(state)
        if state in self.waiting:
            self.waiting.remove(state)
        self.blocks.free_request(state.request_id)

    def _preempt_one(self, protect: RequestState) -> RequestState | None:
        victims = [r for r in self.running if r is not protect]
        if not victims:
            return None
        victim = max(victims, key=lambda r: (r.priority, r.arrival))  # lowest priority, newest
        self.running.remove(victim)
        self.blocks.free_request(victim.request_id)
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
                    and r.may_decode]
        for state in sorted(decoding, key=lambda r: r.arrival):
            if state not in self.running:
                continue  # preempted while making room for an older request
            while not self.blocks.can_append(state.request_id):
                victim = self._preempt_one(protect=state)
                if victim is None:
                    break
                plan.preempted.append(victim)
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
            self.running.append(state)
            n = min(budget, state.rows_ready - cached)
            if n > 0:  # a readmitted live request may still wait for text; it holds its blocks meanwhile
                plan.prefills.append(ScheduledRequest(state, n, cached))
                budget -= n
        return plan
