"""A request's life inside the engine: its prompt, progress, sampling state and output.

States: WAITING (queued, or preempted and waiting to recompute) → PREFILL (prompt rows being
written to the KV cache, possibly over several steps) → DECODE (one frame per step) → FINISHED.

A live request (text still arriving) may lack the text of its next row: its prompt rows are
known only up to the text that has come, and a frame's input row needs that frame's trailing
text row. Until the row is known the request does not run (``rows_ready`` short of ``num_rows``
in prefill, ``next_row`` None in decode) but keeps its KV blocks; ``feed_text`` fills in what
newly arrived text made known. Its frame cap is set when the text ends: before that, every frame
needs one more text id than the last, so it cannot get near the cap of the text so far
(``min_frame_cap`` + 12 frames per id), and it stops exactly where the whole text would have.
"""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field

import torch

from engine.api import Priority, Request, StopReason
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
    next_row: torch.Tensor | None = None  # the input that follows the last frame (decode step input)
    generator: torch.Generator | None = None
    stop_reason: StopReason | None = None
    error: str | None = None
    first_chunk_at: float | None = None
    frames_emitted: int = 0
    cancelled: bool = False
    preemptions: int = 0
    unfed_frame: torch.Tensor | None = None  # F(last frame) while its trailing text row is unknown (live)

    def __post_init__(self) -> None:
        self.pending_rows = self.prompt.prefill
        p = self.sampling
        if p.seed is not None and (p.do_sample or p.subtalker_do_sample):
            self.generator = torch.Generator(device=self.prompt.prefill.device).manual_seed(p.seed)

    @property
    def priority(self) -> Priority:
        return self.request.priority

    @property
    def num_rows(self) -> int:
        """Rows this request occupies in the KV cache once pending rows are computed: the prompt, and
        after a preemption the input row of every generated frame."""
        return self.prompt.length + len(self.frames) if self.pending_rows is not None else 0

    @property
    def rows_ready(self) -> int:
        """Pending rows known now; short of ``num_rows`` only while a live request waits for text."""
        return self.pending_rows.shape[0] if self.pending_rows is not None else 0

    @property
    def may_decode(self) -> bool:
        """The next decode step's input is known (a live request may still wait for its text row)."""
        return self.next_row is not None

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

    def add_frame(self, frame: list[int], embedding: torch.Tensor) -> None:
        """A frame was sampled; ``embedding`` is F(frame), its input row once its text row is added."""
        self.frames.append(frame)
        self.next_row = self.pending_rows = None
        self.unfed_frame = embedding
        self.feed_text()

    def feed_text(self) -> None:
        """Write the rows that known text now allows: more prompt rows, or the last frame's input row."""
        if self.pending_rows is not None and not self.frames:
            self.pending_rows = self.prompt.prefill  # a live prompt grows as its text arrives
        if self.unfed_frame is None:
            return
        text = self.prompt.trailing_row(len(self.frames) - 1)
        if text is None:
            return
        row, self.unfed_frame = self.unfed_frame + text, None
        self.frame_rows.append(row)
        if self.pending_rows is None:
            self.next_row = row
        else:  # preempted while waiting for this row: it is the last row to recompute
            self.pending_rows = torch.cat([self.pending_rows, row[None]])

    def preempt(self) -> None:
        """Drop the KV cache; recompute prompt + generated frames when readmitted."""
        self.preemptions += 1
        rows = [self.prompt.prefill, *[r[None] for r in self.frame_rows]]
        self.pending_rows = torch.cat(rows)
        self.num_computed = 0
        self.next_row = None
        self.status = Status.WAITING
