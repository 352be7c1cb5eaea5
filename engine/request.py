"""A request's life inside the engine: its prompt, progress, sampling state and output.

States: WAITING (queued, or preempted and waiting to recompute) → PREFILL (prompt rows being
written to the KV cache, possibly over several steps) → DECODE (one frame per step) → FINISHED.

A live request (text still arriving) may lack the text of its next row: its prompt rows are
known only up to the text that has come, and a frame is sampled only once the text row that
joins its input is known (the step builds the next input with the frame). Until then the
request does not run (``rows_ready`` short of ``num_rows`` in prefill, ``may_sample`` false in
decode) but keeps its KV blocks; ``feed_text`` adds the prompt rows newly arrived text made
known. Its frame cap is set when the text ends: before that, every frame needs one more text id
than the last, so it cannot get near the cap of the text so far (``min_frame_cap`` + 12 frames
per id), and it stops exactly where the whole text would have.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import time
from dataclasses import dataclass, field

import torch

from engine.api import Priority, Request
from engine.block_manager import chain_hash
from engine.live_prompt import LivePrompt
from engine.prompt import Prompt
from engine.sampling import SamplingParams
from engine.text import LiveText


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    DECODE = "decode"
    FINISHED = "finished"


@dataclass(eq=False)
class RequestState:
    request: Request
    request_id: str
    prompt: Prompt | LivePrompt
    sampling: SamplingParams
    max_frames: int
    live_text: LiveText | None = None  # a live request's text so far; None: the text came whole
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    # Rows the talker must consume before the next frame can be sampled: the prompt at first; after a
    # preemption also the input rows of every frame generated so far (recompute).
    pending_rows: torch.Tensor | None = None
    num_computed: int = 0  # rows of pending_rows already in the KV cache
    frames: list[list[int]] = field(default_factory=list)
    frame_rows: list[torch.Tensor] = field(default_factory=list)  # talker input row of each generated frame
    # The key of every draw (engine/device_sampling.py): the request's seed, or one drawn at admission, so
    # a request readmitted after a preemption continues the same stream.
    seed: int = 0
    first_chunk_at: float | None = None
    preemptions: int = 0
    # The request's row in the step's persistent buffers while it runs (PREFILL or DECODE), given by the
    # scheduler at admission and taken back when it leaves; a decode step runs rows 0..bucket-1.
    slot: int | None = None

    def __post_init__(self) -> None:
        self.pending_rows = self.prompt.prefill
        self.seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(64)

    @property
    def priority(self) -> Priority:
        return self.request.priority

    @property
    def num_rows(self) -> int:
        """Rows this request occupies in the KV cache once pending rows are computed: the prompt, and
        after a preemption the input row of every generated frame."""
        return self.prompt.length + len(self.frames) if self.pending_rows is not None else 0

    @property
    def may_sample(self) -> bool:
        """The text row that joins the next frame's input is known (a live request may wait for it)."""
        return self.prompt.trailing_row(len(self.frames)) is not None

    @property
    def rows_ready(self) -> int:
        """Pending rows that may run now; short of ``num_rows`` only while a live request waits for text:
        rows not known yet, and the last row while the frame it samples has no text row yet."""
        if self.pending_rows is None:
            return 0
        known = self.pending_rows.shape[0]
        return known - 1 if known == self.num_rows and not self.may_sample else known

    @property
    def history(self) -> list[int]:
        return [f[0] for f in self.frames]

    def prefix_block_hashes(self, block_size: int) -> list[int]:
        """Hash chain over the prompt's full blocks, excluding the block that holds the last row
        (it must be computed to produce a hidden state). Equal rows → equal K/V → shareable."""
        if self.preemptions or self.frames:
            return []  # recompute rows include generated frames: nothing worth sharing
        rows = self.prompt.prefill
        full = (rows.shape[0] - 1) // block_size
        hashes, h = [], None
        for i in range(full):
            block = rows[i * block_size:(i + 1) * block_size].float().contiguous().cpu().numpy().tobytes()
            h = chain_hash(h, hashlib.blake2b(block, digest_size=16).digest())
            hashes.append(h)
        return hashes

    def trailing_row(self, frame_index: int) -> torch.Tensor:
        row = self.prompt.trailing_row(frame_index)
        assert row is not None, "a frame was sampled before its text row was known"  # may_sample guards it
        return row

    def feed_text(self) -> None:
        """New text arrived: a live prompt that is still being written gains the rows it now knows."""
        if self.pending_rows is not None and not self.frames:
            self.pending_rows = self.prompt.prefill

    def preempt(self) -> None:
        """Drop the KV cache; recompute prompt + generated frames when readmitted."""
        self.preemptions += 1
        rows = [self.prompt.prefill, *[r[None] for r in self.frame_rows]]
        self.pending_rows = torch.cat(rows)
        self.num_computed = 0
        self.status = Status.WAITING
