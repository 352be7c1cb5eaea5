"""The serving engine: one thread owns the device and runs the step loop; asyncio consumers
submit requests and iterate their audio.

The two sides meet only at thread-safe queues: the event loop never waits for a device step,
and the step loop never waits for the event loop. Each request's output queue is bounded: when a
consumer falls behind, only that request pauses (it keeps its KV blocks and resumes when the
consumer catches up).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.api import AudioChunk, EngineError, EngineStats, Finished, Request, StopReason
from engine.block_manager import BlockManager
from engine.codec_stream import CodecStream
from engine.config import EngineConfig
from engine.generate import default_max_frames
from engine.live_prompt import LivePrompt
from engine.model import TTSModel
from engine.paged_context import PagedKVCache
from engine.prompt import PromptError, build_prompt
from engine.request import RequestState, Status
from engine.runner import Runner
from engine.scheduler import Emitted, Plan, Scheduler
from engine.text import LiveText, TextError
from engine.voice import VoicePrompt

log = logging.getLogger("makima.engine")


class _Consumer:
    """The asyncio side of one request: a queue filled from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self.limit = limit
        self.outstanding = 0  # chunks put but not yet taken (read from the engine thread)
        self.submitted_at = time.perf_counter()

    def put(self, item: AudioChunk | Finished) -> None:
        if isinstance(item, AudioChunk):
            self.outstanding += 1
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    @property
    def full(self) -> bool:
        return self.outstanding >= self.limit


class Engine:
    def __init__(self, model: TTSModel, cfg: EngineConfig | None = None) -> None:
        self.model, self.cfg = model, cfg or EngineConfig()
        if model.device.type == "cpu" and self.cfg.cpu_threads:
            torch.set_num_threads(self.cfg.cpu_threads)  # process-wide: the engine owns the compute
        talker_cfg = model.cfg.talker.transformer
        # The codec first: its state pool and (on CUDA) graphs are allocated now, for max_running streams,
        # so the KV pool below is sized from the memory they leave.
        self.codec = CodecStream(model.speech_tokenizer, self.cfg.chunk_frames,
                                 model.cfg.speech_tokenizer.samples_per_frame, deadline_flush=self.cfg.deadline_flush,
                                 capacity=self.cfg.max_running, cuda_graphs=self.cfg.cuda_graphs)
        num_blocks = self.cfg.num_kv_blocks or max(
            16, int(self._kv_cache_bytes() // PagedKVCache.bytes_per_block(talker_cfg, self.cfg.block_size,
                                                                            model.dtype)))
        self.blocks = BlockManager(num_blocks, self.cfg.block_size)
        self.kv = PagedKVCache(talker_cfg, num_blocks, self.cfg.block_size, model.dtype, model.device)
        self.scheduler = Scheduler(self.cfg, self.blocks)
        self.runner = Runner(model.tts.talker, self.kv, self.blocks, self.cfg.max_running, self.cfg.max_sequence_len,
                             self.cfg.max_batched_tokens, static_graphs=self.cfg.cuda_graphs)
        # The codec stage runs on its own thread, one step behind the model: while it decodes
        # step N's frames, the engine thread runs step N+1 on the other core. Every codec call goes
        # through this single worker, in submission order, so the stream state has one owner.
        self._codec_worker = ThreadPoolExecutor(1, thread_name_prefix="makima-codec")
        self._codec_job: tuple[Future, list[tuple[RequestState, StopReason]], set[str]] | None = None
        self.sample_rate = model.sample_rate
        self.default_sampling = model.sampling()  # generation_config.json of the checkpoint
        self.languages = ["auto", *sorted(k for k in model.cfg.talker.language_ids if "dialect" not in k)]
        self.model_info = model.info
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._states: dict[str, RequestState] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._ids = itertools.count()
        self._frames_generated = 0
        self._step_times: dict[str, float] = {"steps": 0, "step_s": 0.0, "codec_s": 0.0, "schedule_s": 0.0}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="makima-engine", daemon=True)
        self._thread.start()
        if model.device.type == "cuda":
            self.warm_up()

    def warm_up(self) -> None:
        """A few 2-frame requests at batch sizes 1, 3 and 16, so Triton compiles the prefill variants it
        specialises on the batch (1, a multiple of 16, other) now rather than during the first users'
        time to first audio: on an H200 a first 8-session prefill took 0.8 s instead of 0.05 s."""
        voice = self.model.warm_up_voice()
        greedy = self.model.sampling(greedy=True)

        async def batch(n: int) -> None:
            requests = [Request(text="Warming up." * (1 + i % 3), sampling=greedy, max_frames=2,
                                request_id=f"warm-up-{n}-{i}", **voice) for i in range(n)]
            await asyncio.gather(*(self._drain(r) for r in requests))

        async def main() -> None:
            for n in (1, 3, 16):
                await batch(n)

        # Its own thread and loop: callable from synchronous code and from inside a running loop alike.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, main()).result()

    async def _drain(self, request: Request) -> None:
        async for _ in self.submit(request):
            pass

    def _kv_cache_bytes(self) -> float:
        if self.cfg.kv_cache_gb is not None:
            return self.cfg.kv_cache_gb * 2**30
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return min(0.5 * free, 16 * 2**30)
        return 2**30

    @classmethod
    def from_model(cls, model: str | Path, cfg: EngineConfig | None = None) -> Engine:
        cfg = cfg or EngineConfig()
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
        return cls(TTSModel.load(model, device=cfg.device, dtype=dtype, weights=cfg.weights), cfg)

    @property
    def precision(self) -> dict:
        """What the projections compute in and why, plus the compute dtype and threads (/api/v1/info)."""
        threads = torch.get_num_threads() if self.model.device.type == "cpu" else None
        return {**self.model.weight_plan.as_dict(), "dtype": str(self.model.dtype).removeprefix("torch."),
                "cpu_threads": threads}

    # ---- asyncio side ------------------------------------------------------------------------
    async def submit(self, request: Request) -> AsyncIterator[AudioChunk | Finished]:
        """Queue a request; yields its audio chunks in order, then one ``Finished``. Leaving the
        iteration early (break, cancellation, disconnect) cancels the request."""
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        rid = request.request_id
        consumer = _Consumer(asyncio.get_running_loop(), self.cfg.output_queue_chunks)
        self._call(lambda: self._admit(request, consumer))
        finished = False
        try:
            while True:
                item = await consumer.queue.get()
                if isinstance(item, AudioChunk):
                    consumer.outstanding -= 1
                    self._wake.set()  # a paused request may resume
                yield item
                if isinstance(item, Finished):
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(rid)

    def cancel(self, request_id: str) -> None:
        self._call(lambda: self._cancel(request_id))

    def append_text(self, request_id: str, text: str) -> None:
        self._call(lambda: self._live_text(request_id, text))

    def end_text(self, request_id: str) -> None:
        self._call(lambda: self._live_text(request_id, None))

    async def make_voice(self, audio_24k: np.ndarray, ref_text: str | None, x_vector_only: bool) -> VoicePrompt:
        fut: Future = Future()

        def job() -> None:
            try:
                fut.set_result(self.model.voice_prompt(audio_24k, ref_text, x_vector_only))
            except Exception as e:  # reported to the caller, never kills the loop
                fut.set_exception(e)

        self._call(job)
        return await asyncio.wrap_future(fut)

    def stats(self) -> EngineStats:
        running = [s for s in self._states.values() if s.status in (Status.PREFILL, Status.DECODE)]
        return EngineStats(running=len(running), waiting=len(self._states) - len(running),
                           kv_blocks_used=self.blocks.num_used, kv_blocks_total=self.blocks.num_blocks,
                           kv_blocks_cached=self.blocks.num_cached, frames_generated=self._frames_generated,
                           extra={**self._step_times, **self.runner.timings,
                                  "preemptions": self.scheduler.preemptions,
                                  "prefix_rows_reused": self.scheduler.prefix_rows_reused},
                           counters={"engine_steps": self._step_times["steps"], **self.runner.counters,
                                     "codec_calls": self.codec.calls, "codec_frames": self.codec.frames_decoded})

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._codec_worker.shutdown(wait=True)
        self.codec.shutdown()

    def _call(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        self._wake.set()

    # ---- engine thread -----------------------------------------------------------------------
    def _admit(self, request: Request, consumer: _Consumer) -> None:
        # The whole admission sits in the guard, state construction and registration included (a seed
        # torch cannot take raised in RequestState and leaked the consumer's slot forever): any failure
        # here becomes this request's coded Finished and leaves nothing of it behind.
        rid = request.request_id
        state: RequestState | None = None
        try:
            if rid in self._states:
                raise EngineError("DUPLICATE_ID", f"request id {rid!r} is already running")
            model = self.model
            live_text = None
            instruct_ids = model.tokenizer.instruct_ids(request.instruct)
            if request.live:
                if request.non_streaming_text:
                    raise EngineError("INVALID_REQUEST", "non-streaming text needs the whole text first; "
                                                         "it cannot be live")
                live_text = LiveText(model.tokenizer)
                prompt = LivePrompt(model.tts.talker, model.cfg, model.tokenizer.role_ids(), request.voice,
                                    request.language, request.speaker, instruct_ids)
                if request.text:
                    prompt.extend(live_text.append(request.text))
                cap = self.cfg.max_sequence_len  # set from the text when it ends (see engine/request.py)
            else:
                text_ids = model.tokenizer.target_ids(request.text)
                prompt = build_prompt(model.tts.talker, model.cfg, model.tokenizer.role_ids(), text_ids,
                                      request.voice, request.language, request.non_streaming_text, request.speaker,
                                      instruct_ids)
                cap = self._frame_cap(request, len(text_ids))
            sampling = request.sampling or model.sampling()
            sampling.validate()
            max_frames = min(request.max_frames or cap, self.cfg.max_sequence_len - prompt.length)
            if max_frames < 1:
                raise EngineError("TEXT_TOO_LONG", "the prompt does not fit in a request's sequence limit")
            state = RequestState(request=request, request_id=rid, prompt=prompt, sampling=sampling,
                                 max_frames=max_frames, live_text=live_text)
            self._states[rid] = state
            self._consumers[rid] = consumer
            self._codec_worker.submit(self.codec.open, rid, request.codec_context)
            self.scheduler.add(state)
        except Exception as e:
            if isinstance(e, (EngineError, ValueError)):  # refused input (TextError, PromptError, a bad seed)
                code = e.code if isinstance(e, EngineError) else "INVALID_REQUEST"
                message = str(e)
            else:  # anything else about this request fails it, never the engine thread
                log.exception("admitting request %s failed", rid)
                code, message = "SYNTHESIS_ERROR", f"{type(e).__name__}: {e}"
            if state is not None and self._states.get(rid) is state:  # registered before it failed: undo
                self._states.pop(rid)
                self._consumers.pop(rid, None)
                self.scheduler.remove(state)
                self._codec_worker.submit(self.codec.close, rid)
            consumer.put(Finished(rid, StopReason.ERROR, 0, 0.0, None, 0.0, error=message, error_code=code))

    def _frame_cap(self, request: Request, num_text_ids: int) -> int:
        return default_max_frames(num_text_ids, self.model.cfg.generation.max_new_tokens,
                                  self.cfg.frames_per_text_token, self.cfg.min_frame_cap)

    def _live_text(self, request_id: str, piece: str | None) -> None:
        """More text (``piece``) or the end of it (None) for a live request; bad text fails the request."""
        state = self._states.get(request_id)
        if state is None or state.live_text is None:
            return  # finished or cancelled meanwhile (or not live): nothing to feed
        max_frames = None
        try:
            if piece is not None:
                ids = state.live_text.append(piece)
            else:
                ids = state.live_text.end()
                cap = self._frame_cap(state.request, len(state.live_text.committed))
                max_frames = min(state.request.max_frames or cap, self.cfg.max_sequence_len - state.prompt.length)
            self.scheduler.add_text(state, ids, max_frames)
        except (TextError, PromptError) as e:
            self._finish(state, StopReason.ERROR, str(e), "INVALID_REQUEST")

    def _cancel(self, request_id: str) -> None:
        state = self._states.get(request_id)
        if state is not None:
            self._finish(state, StopReason.CANCELLED)

    def _finish(self, state: RequestState, reason: StopReason, error: str | None = None,
                error_code: str | None = None) -> None:
        rid = state.request_id
        self.scheduler.retire(state)  # frees the KV blocks now
        self._codec_worker.submit(self.codec.close, rid)
        self._states.pop(rid, None)
        consumer = self._consumers.pop(rid, None)
        if consumer is not None:
            frames = len(state.frames)
            ttfa = None if state.first_chunk_at is None else state.first_chunk_at - consumer.submitted_at
            seconds = frames * self.model.cfg.speech_tokenizer.samples_per_frame / self.sample_rate
            codes = np.asarray(state.frames, dtype=np.int64).reshape(frames, self.model.cfg.talker.num_code_groups)
            consumer.put(Finished(rid, reason, frames, seconds, ttfa, time.perf_counter() - consumer.submitted_at,
                                  error, error_code, codes))

    def _drain_inbox(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except Exception:  # a bad job is logged; the step loop must survive it
                log.exception("engine job failed")

    def _paused(self) -> set[str]:
        return {rid for rid, c in self._consumers.items() if c.full}

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            try:
                self._run_once()
            except Exception:  # last line of defence: a bug in one iteration must not end serving
                log.exception("engine loop iteration failed")

    def _run_once(self) -> None:
        """One iteration: inbox, schedule, one step, hand its frames to the codec."""
        self._drain_inbox()
        t0 = time.perf_counter()
        plan = self.scheduler.schedule(paused=self._paused())
        t1 = time.perf_counter()
        for state in plan.out_of_memory:
            self._finish(state, StopReason.ERROR, "the KV cache cannot hold this request", "OVERLOADED")
        if not plan.decodes and not plan.prefills:
            if self._codec_job is not None:
                self._complete_codec_job()
                return
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return
        try:
            emitted = self.scheduler.update_from_output(plan, self.runner.step(plan))
        except Exception:  # a failed step fails the request that caused it, never its batchmates
            log.exception("engine step failed; retrying its requests one by one")
            emitted = self._step_one_by_one(plan)
        t2 = time.perf_counter()
        st = self._step_times
        st["steps"] += 1
        st["schedule_s"] += t1 - t0
        st["step_s"] += t2 - t1
        if self._codec_job is not None:
            self._complete_codec_job()  # step N-1's audio, decoded while step N ran
        self._hand_to_codec(emitted)

    def _step_one_by_one(self, plan: Plan) -> list[Emitted]:
        """After a failed batched step: run each request alone; those that still fail are finished
        with SYNTHESIS_ERROR, the others go on as if nothing happened."""
        emitted: list[Emitted] = []
        singles = [Plan(decodes=[it]) for it in plan.decodes] + [Plan(prefills=[it]) for it in plan.prefills]
        for single in singles:
            try:
                emitted += self.scheduler.update_from_output(single, self.runner.step(single))
            except Exception as e:
                state = (single.decodes + single.prefills)[0].state
                log.error("request %s failed alone: %s: %s", state.request_id, type(e).__name__, e)
                self._finish(state, StopReason.ERROR, f"{type(e).__name__}: {e}", "SYNTHESIS_ERROR")
        return emitted

    def _hand_to_codec(self, emitted: list[Emitted]) -> None:
        """Queue a step's frames for the codec worker. (The scheduler has already retired the requests
        that ended: their blocks are free; their Finished follows their audio.)"""
        frames = [(e.state.request_id, e.frame) for e in emitted if e.frame is not None]
        self._frames_generated += len(frames)
        done = [(e.state, e.finished) for e in emitted if e.finished is not None]
        finals = {state.request_id for state, _ in done}
        rids = {rid for rid, _ in frames} | finals
        flush = set(finals)
        if self.cfg.deadline_flush:
            # A live request whose next frame waits for its text: send what it has now rather than hold
            # it for a full chunk while nobody knows when the text comes (a deadline flush: timing moves
            # chunk seams, so the audio is equal to the unflushed one to codec rounding, the codes bitwise).
            flush |= {e.state.request_id for e in emitted if e.frame is not None and e.finished is None
                      and not e.state.may_sample}
        self._codec_job = (self._codec_worker.submit(self._codec_step, frames, flush), done, rids)

    def _codec_step(self, frames: list[tuple[str, list[int]]], flush: set[str]) -> None:
        """On the codec worker: push a step's frames, decode the due chunks and hand them to their
        consumers at once (the consumer queue is thread-safe); Finished follows from the engine
        thread once this job is complete, so it always comes after the last chunk."""
        t0 = time.perf_counter()
        for rid, frame in frames:
            self.codec.push(rid, frame)
        for chunk in self.codec.collect(flush):  # finished requests, and live ones waiting for text
            state, consumer = self._states.get(chunk.request_id), self._consumers.get(chunk.request_id)
            if state is None or consumer is None:
                continue  # cancelled meanwhile
            if state.first_chunk_at is None:
                state.first_chunk_at = time.perf_counter()
            consumer.put(AudioChunk(chunk.request_id, chunk.samples, chunk.first_frame, chunk.num_frames))
        for rid, code, message in self.codec.take_failures():  # e.g. no codec state row free: that request only
            def fail(rid: str = rid, code: str = code, message: str = message) -> None:
                if rid in self._states:
                    self._finish(self._states[rid], StopReason.ERROR, message, code)
            self._call(fail)  # on the engine thread, which owns the request states
        self._step_times["codec_s"] += time.perf_counter() - t0

    def _complete_codec_job(self) -> None:
        """Wait for the pending codec job, then send Finished for the requests it flushed."""
        future, done, rids = self._codec_job
        self._codec_job = None
        try:
            future.result()
        except Exception as e:  # the codec failed: fail the requests of that job, keep serving
            log.exception("codec step failed")
            for rid in rids:
                if rid in self._states:
                    self._finish(self._states[rid], StopReason.ERROR, f"{type(e).__name__}: {e}", "SYNTHESIS_ERROR")
            return
        for state, reason in done:
            if state.request_id in self._states:
                self._finish(state, reason)
