"""Scheduler policy without a model: fake prompts of a given length, a real BlockManager.

A step's consequences are applied by ``finish_step`` below as the engine does today (prefill
progress, PREFILL → DECODE with the prefix commit, one new frame per sampled row): the tests look
only at what the policy decides — who is admitted, who is preempted, how the budget is split, who
fails — so they hold whichever object ends up applying those consequences.
"""

import itertools

import torch

from engine.api import Priority, Request
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.prompt import Prompt
from engine.request import RequestState, Status
from engine.sampling import SamplingParams
from engine.scheduler import Plan, Scheduler
from engine.voice import VoicePrompt

HIDDEN = 4
_ids = itertools.count()


def fake_request(prompt_len: int, priority: Priority = Priority.NORMAL, arrival: float | None = None) -> RequestState:
    """A request whose prompt is ``prompt_len`` rows; rows differ between requests, so no prefix is shared."""
    n = next(_ids)
    rows = torch.full((prompt_len, HIDDEN), float(n))
    prompt = Prompt(prefill=rows, trailing=torch.zeros(0, HIDDEN), pad=torch.zeros(HIDDEN))
    request = Request(text="x", voice=VoicePrompt(speaker_embedding=torch.zeros(HIDDEN)), priority=priority)
    return RequestState(request=request, request_id=f"r{n}", prompt=prompt, sampling=SamplingParams(),
                        max_frames=1000, arrival=float(n) if arrival is None else arrival)


def scheduler(num_blocks: int, block_size: int = 4, max_batched_tokens: int = 512, max_running: int = 64
              ) -> Scheduler:
    cfg = EngineConfig(block_size=block_size, max_batched_tokens=max_batched_tokens, max_running=max_running)
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def finish_step(sched: Scheduler, plan: Plan) -> None:
    """What a successful step does to its requests: prefill progress, and a frame for every
    request whose rows are all in (its prompt done, or a decode)."""
    ready = [it.state for it in plan.decodes]
    for it in plan.prefills:
        st = it.state
        st.num_computed += it.num_rows
        if st.num_computed >= st.num_rows:
            sched.blocks.commit_prefix(st.request_id)
            st.status = Status.DECODE
            ready.append(st)
    for st in ready:
        st.frames.append([0] * 16)
        st.frame_rows.append(torch.zeros(HIDDEN))
        st.next_row, st.pending_rows = st.frame_rows[-1], None


def run_until_decoding(sched: Scheduler, *states: RequestState) -> None:
    for st in states:
        sched.add(st)
    while not all(st.status == Status.DECODE for st in states):
        finish_step(sched, sched.schedule())


def ids(items) -> list[str]:
    return [getattr(it, "state", it).request_id for it in items]


# ---- admission order -------------------------------------------------------------------------------

def test_admission_goes_by_priority_then_arrival_and_nothing_jumps_the_queue():
    sched = scheduler(num_blocks=64, max_running=2)
    low = fake_request(4, Priority.LOW, arrival=0.0)
    normal_late = fake_request(4, Priority.NORMAL, arrival=2.0)
    high = fake_request(4, Priority.HIGH, arrival=3.0)
    normal_early = fake_request(4, Priority.NORMAL, arrival=1.0)
    for st in (low, normal_late, high, normal_early):
        sched.add(st)
    plan = sched.schedule()
    assert ids(plan.prefills) == [high.request_id, normal_early.request_id]  # two slots: best first
    assert low.status == normal_late.status == Status.WAITING
    finish_step(sched, plan)
    sched.remove(high)  # a slot frees: the next in (priority, arrival) order gets it, not the oldest
    plan = sched.schedule()
    assert ids(plan.prefills) == [normal_late.request_id]


def test_a_waiting_head_that_does_not_fit_blocks_smaller_requests_behind_it():
    sched = scheduler(num_blocks=4)  # 16 positions
    running = fake_request(8, Priority.HIGH)
    run_until_decoding(sched, running)
    big, small = fake_request(12, Priority.NORMAL), fake_request(2, Priority.LOW)
    sched.add(small)
    sched.add(big)
    plan = sched.schedule()
    assert ids(plan.prefills) == [] and big.status == small.status == Status.WAITING


# ---- preemption ---------------------------------------------------------------------------------------

def test_preemption_takes_the_lowest_priority_even_when_it_is_the_oldest():
    # 4 blocks of 4: `grows` has filled its block and needs a fifth; the others have room in theirs.
    sched = scheduler(num_blocks=4)
    low_oldest = fake_request(2, Priority.LOW, arrival=0.0)
    normal = fake_request(2, Priority.NORMAL, arrival=1.0)
    high = fake_request(2, Priority.HIGH, arrival=2.0)
    grows = fake_request(4, Priority.NORMAL, arrival=3.0)
    run_until_decoding(sched, low_oldest, normal, high, grows)
    assert sched.blocks.num_free == 0
    plan = sched.schedule()
    assert low_oldest.status == Status.WAITING and low_oldest in sched.waiting
    assert low_oldest.request_id not in sched.blocks.tables  # its blocks are free again
    assert ids(plan.decodes) == [normal.request_id, high.request_id, grows.request_id]
    assert sched.preemptions == 1 and plan.out_of_memory == []


def test_preemption_among_equal_priorities_takes_the_newest():
    sched = scheduler(num_blocks=4)
    grows = fake_request(4, arrival=0.0)  # the oldest needs the block
    others = [fake_request(2, arrival=t) for t in (1.0, 2.0, 3.0)]
    run_until_decoding(sched, grows, *others)
    plan = sched.schedule()
    newest = others[-1]
    assert newest.status == Status.WAITING and sched.preemptions == 1
    assert ids(plan.decodes) == [grows.request_id, others[0].request_id, others[1].request_id]


def test_a_preempted_request_comes_back_with_its_generated_rows_to_recompute():
    sched = scheduler(num_blocks=4)
    grows, victim = fake_request(4, arrival=0.0), fake_request(2, arrival=1.0)
    filler = fake_request(6, arrival=0.5)
    run_until_decoding(sched, grows, filler, victim)
    frames = len(victim.frames)
    finish_step(sched, sched.schedule())  # victim preempted
    assert victim.status == Status.WAITING and victim.num_rows == 2 + frames
    sched.remove(filler)  # room again: it is readmitted and recomputes prompt + frames in one chunk
    plan = sched.schedule()
    assert [(it.state.request_id, it.start, it.num_rows) for it in plan.prefills] == [
        (victim.request_id, 0, 2 + frames)]


# ---- chunked prefill under the token budget -------------------------------------------------------------

def test_decodes_come_first_and_prefill_chunks_fill_the_budget_without_exceeding_it():
    budget = 10
    sched = scheduler(num_blocks=64, max_batched_tokens=budget)
    decoding = [fake_request(2) for _ in range(3)]
    run_until_decoding(sched, *decoding)
    long_a, long_b = fake_request(20), fake_request(9)
    sched.add(long_a)
    sched.add(long_b)
    progress = {long_a.request_id: 0, long_b.request_id: 0}
    plans = []
    while not (long_a.status == long_b.status == Status.DECODE):
        plan = sched.schedule()
        plans.append(plan)
        assert len(plan.decodes) + sum(it.num_rows for it in plan.prefills) <= budget
        assert set(ids(decoding)) <= set(ids(plan.decodes))  # running streams never wait for a prefill
        for it in plan.prefills:  # chunks are contiguous and never run past the prompt
            assert it.start == progress[it.state.request_id] and it.start + it.num_rows <= it.state.num_rows
            progress[it.state.request_id] += it.num_rows
        finish_step(sched, plan)
        assert len(plans) < 20
    # The budget is used: every step before the last is full (3 decodes + 7 prefill rows).
    assert [len(p.decodes) + sum(it.num_rows for it in p.prefills) for p in plans[:-1]] == [budget] * (len(plans) - 1)
    # A request already prefilling continues before the next is admitted; once long_a decodes it takes
    # a decode row, leaving 6 for long_b.
    a, b = long_a.request_id, long_b.request_id
    assert [[(ids([it])[0], it.num_rows) for it in p.prefills] for p in plans] == [
        [(a, 7)], [(a, 7)], [(a, 6), (b, 1)], [(b, 6)], [(b, 2)]]


# ---- out of memory --------------------------------------------------------------------------------------

def test_out_of_memory_fails_only_the_request_that_cannot_grow():
    sched = scheduler(num_blocks=3)
    hog = fake_request(11)  # 11 prompt rows, then one decode: all 12 positions of the pool
    run_until_decoding(sched, hog)
    finish_step(sched, sched.schedule())
    waiting = fake_request(2)
    sched.add(waiting)
    plan = sched.schedule()
    assert ids(plan.out_of_memory) == [hog.request_id]  # alone, nothing to preempt: it cannot fit
    assert hog.request_id not in sched.blocks.tables and hog not in sched.running
    assert ids(plan.prefills) == [waiting.request_id]  # the others go on, in the same step
    assert ids(plan.decodes) == [] and sched.preemptions == 0


def test_running_out_of_blocks_preempts_rather_than_fails_when_there_is_a_victim():
    sched = scheduler(num_blocks=3)
    hog, small = fake_request(7, Priority.HIGH), fake_request(2, Priority.LOW)  # 2 blocks + 1 block
    run_until_decoding(sched, hog, small)
    finish_step(sched, sched.schedule())  # hog's 8th position: its two blocks are full
    plan = sched.schedule()  # hog needs a third block, the pool has none: small makes room
    assert plan.out_of_memory == [] and ids(plan.decodes) == [hog.request_id]
    assert small.status == Status.WAITING and sched.preemptions == 1
