"""Sampling in the official order (transformers 4.57.3 generate, spec §4.4), batched over rows.

Talker (codebook 0): repetition penalty over this utterance's generated codebook-0 ids →
EOS forbidden for the first ``min_new_tokens`` frames → control ids suppressed (all of
[vocab−1024, vocab) except EOS) → temperature → top-k → top-p → softmax → multinomial.
Code predictor (codebooks 1..15): temperature → top-k → top-p → multinomial.
Greedy is argmax of the processed logits (the warpers do not change the argmax).

The reference path (engine/generate.py) gives each request a ``torch.Generator`` seeded from its
seed; with the same seed the draws equal the official code's (which uses the
global generator after ``torch.manual_seed``), in the same order: 15 predictor draws for frame
g, then the talker draw for frame g+1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

MIN_NEW_TOKENS = 2  # the official generate() passes min_new_tokens=2 to the talker


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    subtalker_do_sample: bool = True
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    seed: int | None = None

    def with_overrides(self, **overrides: object) -> SamplingParams:
        """These params with every override that is not None (a request's own choices)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def with_user_options(self, greedy: bool = False, seed: int | None = None, temperature: float | None = None,
                          top_k: int | None = None, top_p: float | None = None,
                          repetition_penalty: float | None = None) -> SamplingParams:
        """The options users set (CLI flags, a JSONL line, a WebSocket ``start``): one temperature,
        top-k and top-p apply to both the talker and the code predictor. Not validated here."""
        p = self.with_overrides(seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, subtalker_temperature=temperature,
                                subtalker_top_k=top_k, subtalker_top_p=top_p)
        return p.greedy() if greedy else p

    def greedy(self) -> SamplingParams:
        return replace(self, do_sample=False, subtalker_do_sample=False)

    def validate(self) -> None:
        floats = (self.temperature, self.top_p, self.repetition_penalty, self.subtalker_temperature,
                  self.subtalker_top_p)
        if not all(math.isfinite(v) for v in floats):
            raise ValueError("sampling values must be finite numbers")  # NaN/inf logits fail the step
        if not (0 <= self.top_k < 2**31 and 0 <= self.subtalker_top_k < 2**31):
            raise ValueError("top_k must be in [0, 2**31)")
        if self.temperature <= 0 or self.subtalker_temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.top_k < 0 or self.subtalker_top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not (0 < self.top_p <= 1) or not (0 < self.subtalker_top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")


Rule = tuple[bool, float, int, float]  # (do_sample, temperature, top_k, top_p) of one draw


def talker_rule(p: SamplingParams) -> Rule:
    return p.do_sample, p.temperature, p.top_k, p.top_p


def predictor_rule(p: SamplingParams) -> Rule:
    return p.subtalker_do_sample, p.subtalker_temperature, p.subtalker_top_k, p.subtalker_top_p


def apply_repetition_penalty(logits: torch.Tensor, histories: Sequence[Sequence[int]],
                             penalties: Sequence[float]) -> torch.Tensor:
    """logits [B, V]; row b's ids seen so far and its penalty. Divides positive, multiplies negative
    scores (each seen id once, however often it was seen). Returns a new tensor."""
    logits = logits.clone()
    rows = [b for b, (seen, p) in enumerate(zip(histories, penalties, strict=True)) if p != 1.0 and seen]
    if not rows:
        return logits
    row_ids = torch.tensor([b for b in rows for _ in histories[b]], device=logits.device)
    col_ids = torch.tensor([i for b in rows for i in histories[b]], device=logits.device)
    penalty = torch.tensor([penalties[b] for b in rows for _ in histories[b]], dtype=logits.dtype,
                           device=logits.device)
    scores = logits[row_ids, col_ids]
    logits[row_ids, col_ids] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k (ties with the k-th kept), then top-p, per row of ``[..., V]``; masked
    entries → −inf. Every op works row by row, so a row's result does not depend on the others."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def draw_rows(logits: torch.Tensor, rules: Sequence[Rule],
              generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of fp32 logits ``[B, V]`` → int64 ``[B]`` on the logits' device.

    Rows that share a rule are warped together (one batched op instead of B); each sampled row then
    draws with its own generator, so its token depends only on its logits and its own seed. The host
    waits for the device once per sampled rule (the finiteness check), never per row."""
    drawn = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    groups: dict[Rule, list[int]] = {}
    for row, rule in enumerate(rules):
        groups.setdefault(rule, []).append(row)
    for (do_sample, temperature, top_k, top_p), rows in groups.items():
        part = logits if len(rows) == logits.shape[0] else logits[rows]
        if not do_sample:  # greedy: the warpers never change the argmax
            drawn[rows] = part.argmax(dim=-1)
            continue
        probs = warp(part, temperature, top_k, top_p).softmax(dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("non-finite sampling probabilities (the model produced NaN or inf logits)")
        # torch.multinomial(p, 1) is argmax(p / q) with q ~ Exp(1) drawn by exponential_ on a tensor
        # shaped like p: the same draws, bit for bit (tested against it). Done here so each row
        # draws its noise from its own generator, but the division and argmax run once for all rows,
        # and without multinomial's validity check per call, which waits for the GPU every time.
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            noise[i].exponential_(1, generator=generators[row])
        drawn[rows] = (probs / noise).argmax(dim=-1)
    return drawn


class TalkerLogitsProcessor:
    """Masks and penalties on codebook-0 logits before the draw (steps 1–3 of the order), batched."""

    def __init__(self, vocab_size: int, eos_id: int) -> None:
        self.eos_id = eos_id
        self.suppressed = torch.tensor([i for i in range(vocab_size - 1024, vocab_size) if i != eos_id])

    def __call__(self, logits: torch.Tensor, histories: Sequence[Sequence[int]], params: Sequence[SamplingParams]
                 ) -> torch.Tensor:
        """logits [B, V]; row b has generated ``len(histories[b])`` frames with these codebook-0 ids."""
        logits = apply_repetition_penalty(logits, histories, [p.repetition_penalty for p in params])
        early = [b for b, seen in enumerate(histories) if len(seen) < MIN_NEW_TOKENS]
        if early:
            logits[early, self.eos_id] = float("-inf")
        logits[:, self.suppressed.to(logits.device)] = float("-inf")
        return logits
