"""Sampling on the device with fixed shapes: per-row parameters as tensors, no host synchronisation.

The same order as ``engine.sampling`` (spec §4.4), written so a whole frame can be captured in one
CUDA graph: every op works on ``[B, V]`` or ``[B]`` tensors whatever the rows ask for, nothing
reads a value back to the host, no shape depends on data, and no ``torch.Generator`` is used.

- Per-row parameters live in static buffers (``RowSampling``) written once at admission.
- The repetition state is a ``seen[B, V]`` bool mask on the device (``mark_seen`` after each draw).
- The draw is ``argmax(p / E)`` with ``E ~ Exp(1)`` (what ``torch.multinomial`` does), but ``E``
  comes from counter-based noise: a 64-bit hash of (row seed, frame, codebook, vocab column). A
  row's draw is therefore a function of its logits and its key only — batch invariant by
  construction and reproducible run to run. The noise bits are the same on CPU and CUDA (integer
  ops); the probabilities they race are float ops, so a CPU and a CUDA draw can differ where the
  two round a probability differently.
  The draws do *not* equal the official code's token for token (it uses the global generator);
  greedy rows do (argmax of the same processed logits).

Rows whose probabilities are not finite (NaN/inf logits) still get an in-range code, so a graph
never indexes out of bounds; they are flagged in ``invalid`` for the host to fail after its copy.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from engine.sampling import MIN_NEW_TOKENS, Rule, SamplingParams, predictor_rule, talker_rule

_MASK64 = (1 << 64) - 1


def _signed64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 torch stores (two's complement)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA = _signed64(0x9E3779B97F4A7C15)  # splitmix64's increment (odd: columns map to distinct states)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)
_CODEBOOK_BITS = 8  # key counter = frame << 8 | codebook: unique while a frame has < 256 codebooks


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking the sign-filled bits makes it the logical shift.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection on 64-bit words (int64 multiply wraps mod 2**64)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def row_keys(seed: torch.Tensor, frame: torch.Tensor, codebook: int) -> torch.Tensor:
    """int64 [B]: one key per (seed, frame, codebook). For one seed, distinct (frame, codebook)
    give distinct keys (``_mix64`` is a bijection)."""
    return _mix64(_mix64(seed) ^ ((frame << _CODEBOOK_BITS) | codebook))


def noise_bits(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 [B, V] in [0, 2**53): column v of row b is splitmix64's (v+1)-th output from state
    keys[b], so it depends on (keys[b], v) only. Integer ops: the same bits on every device."""
    columns = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=keys.device) * _GAMMA
    return _shift_right(_mix64(keys[:, None] + columns[None, :]), 11)


def exponential_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 [B, V] of Exp(1) draws from ``noise_bits``.

    53 bits make u uniform on (0, 1) (never 0 or 1, so E is finite and > 0); E = −log u is taken in
    float64 and rounded to float32, the precision of the race it feeds."""
    u = (noise_bits(keys, vocab_size).to(torch.float64) + 0.5) * 2.0**-53
    return (-torch.log(u)).to(torch.float32)


@dataclass
class DrawRule:
    """One draw rule's per-row parameters (the tensor form of ``engine.sampling.Rule``)."""

    do_sample: torch.Tensor  # bool [R]; False: argmax
    temperature: torch.Tensor  # float32 [R], > 0
    top_k: torch.Tensor  # int64 [R]; 0 (or ≥ V): off
    # 1 − top_p, computed in float64 on the host and rounded to float32, as HF's `cum <= 1 - top_p`
    # does with a Python float: the same cut to the bit. 0: top-p off.
    top_p_cut: torch.Tensor  # float32 [R]

    @classmethod
    def allocate(cls, max_rows: int, device: torch.device) -> DrawRule:
        return cls(do_sample=torch.zeros(max_rows, dtype=torch.bool, device=device),
                   temperature=torch.ones(max_rows, dtype=torch.float32, device=device),
                   top_k=torch.zeros(max_rows, dtype=torch.int64, device=device),
                   top_p_cut=torch.zeros(max_rows, dtype=torch.float32, device=device))

    def __getitem__(self, rows: slice) -> DrawRule:
        return DrawRule(self.do_sample[rows], self.temperature[rows], self.top_k[rows], self.top_p_cut[rows])

    def set_row(self, i: int, rule: Rule) -> None:
        do_sample, temperature, top_k, top_p = rule
        self.do_sample[i] = do_sample
        self.temperature[i] = temperature
        self.top_k[i] = top_k
        self.top_p_cut[i] = 1 - top_p if top_p < 1 else 0.0


@dataclass
class RowSampling:
    """Static per-row sampling buffers ``[max_rows]``; ``rows[:B]`` views the first B for a bucket.

    Unset rows are greedy with neutral parameters, so the padding rows of a bucket compute
    harmlessly."""

    talker: DrawRule
    predictor: DrawRule
    repetition_penalty: torch.Tensor  # float32 [R]
    seed: torch.Tensor  # int64 [R]: the key of every draw of the row

    @classmethod
    def allocate(cls, max_rows: int, device: torch.device | str) -> RowSampling:
        device = torch.device(device)
        return cls(talker=DrawRule.allocate(max_rows, device), predictor=DrawRule.allocate(max_rows, device),
                   repetition_penalty=torch.ones(max_rows, dtype=torch.float32, device=device),
                   seed=torch.zeros(max_rows, dtype=torch.int64, device=device))

    def __getitem__(self, rows: slice) -> RowSampling:
        return RowSampling(self.talker[rows], self.predictor[rows], self.repetition_penalty[rows], self.seed[rows])

    def set_row(self, i: int, params: SamplingParams, seed: int | None = None) -> int:
        """Write row i (host scalars into the device buffers: at admission, never per step).
        The seed is ``seed``, else ``params.seed``, else drawn here; returned so the caller can
        keep it (a preempted request readmitted with it continues the same stream)."""
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.talker.set_row(i, talker_rule(params))
        self.predictor.set_row(i, predictor_rule(params))
        self.repetition_penalty[i] = params.repetition_penalty
        self.seed[i] = _signed64(seed)
        return seed


@dataclass(frozen=True)
class TalkerVocab:
    """The talker's fixed masks over its vocabulary: control ids always suppressed, the EOS column."""

    suppressed: torch.Tensor  # bool [V]
    eos: torch.Tensor  # bool [V], True at the EOS id only

    @classmethod
    def build(cls, vocab_size: int, eos_id: int, device: torch.device | str) -> TalkerVocab:
        ids = torch.arange(vocab_size, device=device)
        return cls(suppressed=(ids >= vocab_size - 1024) & (ids != eos_id), eos=ids == eos_id)


def mark_seen(seen: torch.Tensor, codes: torch.Tensor) -> None:
    """Record each row's new codebook-0 id in its repetition mask (in place)."""
    seen.scatter_(1, codes[:, None], True)


def reset_seen_row(seen: torch.Tensor, i: int, history: list[int]) -> None:
    """Row i's mask from a request's codebook-0 history (admission, or readmission after preemption)."""
    seen[i] = False
    if history:
        seen[i, history] = True


def process_talker_logits(logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor, num_frames: torch.Tensor,
                          vocab: TalkerVocab) -> torch.Tensor:
    """Steps 1–3 of the talker order: repetition penalty over the seen ids, EOS forbidden while
    ``num_frames < MIN_NEW_TOKENS``, control ids suppressed. Returns a new ``[B, V]`` tensor."""
    penalty = rows.repetition_penalty[:, None]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    logits = torch.where(seen, penalised, logits)
    early = (num_frames < MIN_NEW_TOKENS)[:, None]
    return logits.masked_fill(vocab.suppressed[None, :] | (vocab.eos[None, :] & early), float("-inf"))


def warp_rows(logits: torch.Tensor, rule: DrawRule) -> torch.Tensor:
    """Temperature → top-k (ties with the k-th kept) → top-p per row, each row its own values, with
    one sort. Equals ``engine.sampling.warp`` row by row, except where tied logits straddle the
    top-p cut: HF drops some of the tied ids (which ones is up to its sort), this keeps them all."""
    vocab = logits.shape[-1]
    logits = logits / rule.temperature[:, None]
    ascending = torch.sort(logits, dim=-1).values
    k_on = (rule.top_k > 0) & (rule.top_k < vocab)
    kth = ascending.gather(1, (vocab - rule.top_k).clamp(0, vocab - 1)[:, None])  # the k-th largest
    kth = kth.masked_fill(~k_on[:, None], float("-inf"))
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))  # still sorted: top-k cut its head
    # Top-p as HF writes it: in ascending order, drop the ids whose cumulative mass is ≤ 1 − top_p,
    # always keeping the most likely. The cumulative mass only grows, so the dropped ids are the
    # first n: everything below the (n+1)-th value goes (a threshold, not a scatter back by index).
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)
    dropped = ((cum <= rule.top_p_cut[:, None]) & (rule.top_p_cut > 0)[:, None]).sum(dim=-1, keepdim=True)
    floor = ascending.gather(1, dropped.clamp(max=vocab - 1))
    return logits.masked_fill((logits < kth) | (logits < floor), float("-inf"))


def draw(logits: torch.Tensor, rule: DrawRule, keys: torch.Tensor, invalid: torch.Tensor | None = None
         ) -> torch.Tensor:
    """int64 [B]: sampled rows draw from softmax(warp(logits)) with their keyed noise; greedy rows
    take argmax(logits). Both are computed for every row (fixed shape), then selected."""
    probs = warp_rows(logits, rule).softmax(dim=-1)
    if invalid is not None:
        invalid |= ~torch.isfinite(probs).all(dim=-1)
    sampled = (probs / exponential_noise(keys, logits.shape[-1])).argmax(dim=-1)
    return torch.where(rule.do_sample, sampled, logits.argmax(dim=-1))


def sample_talker(logits: torch.Tensor, rows: RowSampling, seen: torch.Tensor, num_frames: torch.Tensor,
                  vocab: TalkerVocab, invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Codebook 0 of frame ``num_frames[b]`` for each row: fp32 logits ``[B, V]`` → int64 ``[B]``.
    ``seen`` is not updated here (``mark_seen`` once the frame is kept)."""
    processed = process_talker_logits(logits, rows, seen, num_frames, vocab)
    return draw(processed, rows.talker, row_keys(rows.seed, num_frames, 0), invalid)


def sample_predictor(logits: torch.Tensor, rows: RowSampling, frame_index: torch.Tensor, codebook: int,
                     invalid: torch.Tensor | None = None) -> torch.Tensor:
    """Codebook ``codebook`` (1..15) of frame ``frame_index[b]``: no penalty, no masks (spec §4.4)."""
    return draw(logits, rows.predictor, row_keys(rows.seed, frame_index, codebook), invalid)
