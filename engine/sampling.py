"""Sampling in the official order (transformers 4.57.3 generate, spec §4.4), batched over rows.

Talker (codebook 0): repetition penalty over this utterance's generated codebook-0 ids →
EOS forbidden for the first ``min_new_tokens`` frames → control ids suppressed (all of
[vocab−1024, vocab) except EOS) → temperature → top-k → top-p → softmax → multinomial.
Code predictor (codebooks 1..15): temperature → top-k → top-p → multinomial.
Greedy is argmax of the processed logits (the warpers do not change the argmax).

Each request owns a ``torch.Generator`` seeded from its seed, so a request's draws never depend
on its batch neighbours; with the same seed the draws equal the official code's (which uses the
global generator after ``torch.manual_seed``), in the same order: 15 predictor draws for frame
g, then the talker draw for frame g+1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from engine.config import GenerationDefaults

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

    @classmethod
    def from_defaults(cls, gen: GenerationDefaults, **overrides: object) -> SamplingParams:
        base = cls(do_sample=gen.do_sample, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                   repetition_penalty=gen.repetition_penalty, subtalker_do_sample=gen.subtalker_do_sample,
                   subtalker_temperature=gen.subtalker_temperature, subtalker_top_k=gen.subtalker_top_k,
                   subtalker_top_p=gen.subtalker_top_p)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

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


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V]; history: 1-D ids seen so far. Divides positive, multiplies negative scores."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    scores = logits.gather(0, history)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, history, scores)


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k (ties with the k-th kept), then top-p; masked entries → −inf."""
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


def draw(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None) -> int:
    """One token from 1-D fp32 logits."""
    if not do_sample:
        return int(torch.argmax(logits))
    probs = warp(logits, temperature, top_k, top_p).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class TalkerLogitsProcessor:
    """Masks and penalties on codebook-0 logits before the draw (steps 1–3 of the order)."""

    def __init__(self, vocab_size: int, eos_id: int) -> None:
        self.eos_id = eos_id
        self.suppressed = torch.tensor([i for i in range(vocab_size - 1024, vocab_size) if i != eos_id])

    def __call__(self, logits: torch.Tensor, history: torch.Tensor, frame_index: int,
                 params: SamplingParams) -> torch.Tensor:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
        logits = logits.clone()
        if frame_index < MIN_NEW_TOKENS:
            logits[self.eos_id] = float("-inf")
        logits[self.suppressed.to(logits.device)] = float("-inf")
        return logits
