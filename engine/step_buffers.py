"""The persistent inputs of an engine step: host buffers (pinned on CUDA) and the static device buffers
that the decode functions of every batch bucket, the CUDA graphs that replay them, and the eager
prefill forward all read.

Rows are the scheduler's *slots*: a running request keeps its slot from admission until it leaves, so
what belongs to it stays in place from step to step — its block-table row (written only when the
request gains a block), its next talker input row and hidden state (written on the device by the step
itself). A step writes on the host only what changes every step anyway (each decode row's position,
KV slot and context length, which rows are active) and copies that to the device in one transfer per
buffer; it builds no tensor per request. (vLLM's input batch and nano-vllm's graph variables.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class Mirrored:
    """A device buffer and its host twin (pinned on CUDA, so the copy is asynchronous); ``np`` is the
    host side as a numpy array, written in place by the step."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, fill: int = 0) -> None:
        self.host = torch.full(shape, fill, dtype=dtype, pin_memory=device.type == "cuda")
        self.np = self.host.numpy()
        self.dev = torch.full(shape, fill, dtype=dtype, device=device)

    def upload(self, n: int) -> torch.Tensor:
        """The first ``n`` entries on the device (one copy); returns that device view."""
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        return self.dev[:n]


class StepBuffers:
    def __init__(self, rows: int, hidden: int, num_codebooks: int, vocab_size: int, table_width: int,
                 max_prefill_tokens: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.table_width, self.device = rows, table_width, device

        # Per decode row (= slot): position and KV slot of its new row, its context length, and whether it
        # decodes / samples a frame this step. Inactive rows are padding: KV slot -1 writes nothing,
        # context length 1 reads one cached position, and their outputs are discarded.
        self.positions = Mirrored((rows,), torch.long, device)
        self.slot_mapping = Mirrored((rows,), torch.long, device, -1)
        self.context_lens = Mirrored((rows,), torch.int32, device, 1)
        self.decoding = Mirrored((rows,), torch.bool, device)
        self.sampling = Mirrored((rows,), torch.bool, device)
        self.block_tables = Mirrored((rows, table_width), torch.int32, device)
        # Per sampling row: the index of the frame it samples now (the key of its draws, and the
        # min-new-tokens rule), and the codebook-0 id of its previous frame (-1: none) that joins its
        # repetition mask. Written by the host, so a retried step computes the same frame again.
        self.num_frames = Mirrored((rows,), torch.long, device)
        self.prev_c0 = Mirrored((rows,), torch.long, device, -1)
        self._table_len = [0] * rows  # block-table entries of each slot already written
        self._owner: list[tuple[object, int] | None] = [None] * rows
        # Written on the device by the step: the talker input after each slot's last frame (``x``; the
        # frame writes ``x_next``, which the runner commits once the step has succeeded), the talker's
        # hidden state its frame is sampled from, the text row that joins its next input, the codebook-0
        # ids its frames produced (the repetition mask), its codes plus an "invalid" flag column.
        self.x = torch.zeros(rows, hidden, dtype=dtype, device=device)
        self.x_next = torch.zeros(rows, hidden, dtype=dtype, device=device)
        self.hidden = torch.zeros(rows, hidden, dtype=dtype, device=device)
        self.trailing = torch.zeros(rows, hidden, dtype=dtype, device=device)
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        self.codes = torch.zeros(rows, num_codebooks + 1, dtype=torch.long, device=device)
        # One host buffer per use within a step: on CUDA a copy may still be reading it when the host
        # writes the next one. The prefill part: one entry per prompt row of the step's chunks (at most
        # the token budget).
        self.pf_positions = Mirrored((max_prefill_tokens,), torch.long, device)
        self.pf_slot_mapping = Mirrored((max_prefill_tokens,), torch.long, device, -1)
        self.pf_cu_seqlens = Mirrored((rows + 1,), torch.int32, device)
        self.pf_context_lens = Mirrored((rows,), torch.int32, device)
        self.pf_slots = Mirrored((rows,), torch.long, device)
        self.pf_last = Mirrored((rows,), torch.long, device)  # row of each finished prompt's last token
        self.pf_done = Mirrored((rows,), torch.long, device)  # ... and its slot
        self.index = Mirrored((rows,), torch.long, device)  # the slots that sample a frame this step

        self._copied = torch.cuda.Event() if device.type == "cuda" else None

    def begin(self) -> None:
        """Before a step writes host buffers: the previous step's copies out of them must be done. (A
        step that samples ends with a blocking copy anyway; a prefill-only step does not.)"""
        if self._copied is not None:
            self._copied.synchronize()

    def end(self) -> None:
        """After a step's last copy from the host buffers has been issued."""
        if self._copied is not None:
            self._copied.record()

    def claim(self, slot: int, owner: object, epoch: int) -> bool:
        """Note who occupies ``slot``; True when that is new (a new request, or one readmitted after a
        preemption: ``epoch`` changed), so its block-table row is rewritten from the start."""
        if self._owner[slot] == (owner, epoch):
            return False
        self._owner[slot] = (owner, epoch)
        self._table_len[slot] = 0
        return True

    def write_table(self, slot: int, blocks: Sequence[int]) -> None:
        """Bring a slot's block-table row up to date: only the entries it gained are written."""
        have = self._table_len[slot]
        if len(blocks) == have:
            return
        self.block_tables.np[slot, have:len(blocks)] = blocks[have:]
        self.block_tables.dev[slot].copy_(self.block_tables.host[slot], non_blocking=True)
        self._table_len[slot] = len(blocks)

    def kv_slot(self, slot: int, position: int | np.ndarray, block_size: int) -> int | np.ndarray:
        """The KV-cache slot of ``position`` in the sequence held by ``slot`` (its table must be written)."""
        return self.block_tables.np[slot, position // block_size].astype(np.int64) * block_size + position % block_size

    def upload_decode(self, b: int) -> None:
        """Copy rows ``0..b-1`` of the per-row inputs the host wrote to the device."""
        for buf in (self.positions, self.slot_mapping, self.context_lens, self.decoding, self.sampling,
                    self.num_frames, self.prev_c0):
            buf.upload(b)
