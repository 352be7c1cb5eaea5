"""The reference decode loop for one request (spec §4.3), in plain PyTorch.

Per frame: codebook-0 logits from the talker's last hidden state → processed and drawn → stop
on EOS → the code predictor fills codebooks 1..15 from a fresh cache → the next talker input is
the sum of the frame's 16 code embeddings plus the next trailing text row (or ``tts_pad``).

This path is the oracle for the serving engine: simple, batch 1, no paging, and its seeded draws
follow the official code's generator order (engine/sampling.py), which the engine's keyed device
sampler (engine/device_sampling.py) does not: the engine's greedy codes equal this path's, its
seeded codes do not. The engine's one decode loop is engine/runner.py + engine/cuda_graphs.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.models.talker import Talker
from engine.prompt import Prompt
from engine.sampling import SamplingParams, TalkerLogitsProcessor, draw_rows, predictor_rule, talker_rule

# Frame cap from the text length: ~4 frames (0.32 s) of speech per text token is typical for
# this model in English and Chinese; the cap allows 3x that plus a floor, so a request that
# never samples EOS (~0.3 % on this model, per peers) stops after seconds, not minutes.
FRAMES_PER_TEXT_TOKEN = 12
MIN_FRAME_CAP = 40


def default_max_frames(num_text_tokens: int, model_limit: int, frames_per_text_token: int = FRAMES_PER_TEXT_TOKEN,
                       min_frame_cap: int = MIN_FRAME_CAP) -> int:
    """The runaway guard: a frame cap from the text length, never above the model's own limit."""
    return min(model_limit, min_frame_cap + frames_per_text_token * num_text_tokens)


@dataclass
class Trace:
    """Optional capture of every raw logit vector, for parity tests."""

    talker_logits: list[torch.Tensor] = field(default_factory=list)
    predictor_logits: list[torch.Tensor] = field(default_factory=list)  # [15, vocab] per frame


@dataclass
class GenerationResult:
    codes: torch.Tensor  # [frames, 16] int64
    stop_reason: str  # "eos" or "max_frames"
    prefill_seconds: float = 0.0
    talker_seconds: float = 0.0
    predictor_seconds: float = 0.0


@torch.inference_mode()
def predict_residual_codes(talker: Talker, hidden: torch.Tensor, c0: int, params: SamplingParams,
                           generator: torch.Generator | None, trace: Trace | None = None) -> list[int]:
    """Codebooks 1..15 for one frame. hidden: [1, talker_hidden], the talker's normed output."""
    predictor = talker.code_predictor
    ctx = predictor.new_context(batch=1)
    c0_embed = talker.embed_codec(torch.tensor([c0], device=hidden.device))
    x = torch.stack([hidden, c0_embed], dim=1)  # [1, 2, talker_hidden]
    codes, logits_seen = [], []
    for j in range(predictor.num_residual_codebooks):
        logits = predictor.step(x, ctx, head=j)[0]
        if trace is not None:
            logits_seen.append(logits)
        code = int(draw_rows(logits[None], [predictor_rule(params)], [generator])[0])
        codes.append(code)
        if j + 1 < predictor.num_residual_codebooks:
            table = predictor.model.codec_embedding[j]
            x = table(torch.tensor([[code]], device=hidden.device))
    if trace is not None:
        trace.predictor_logits.append(torch.stack(logits_seen))
    return codes


@torch.inference_mode()
def generate_codes(talker: Talker, prompt: Prompt, params: SamplingParams, max_frames: int,
                   trace: Trace | None = None) -> GenerationResult:
    cfg = talker.cfg
    device = prompt.prefill.device
    generator = None
    if params.seed is not None and (params.do_sample or params.subtalker_do_sample):
        generator = torch.Generator(device=device).manual_seed(params.seed)
    process = TalkerLogitsProcessor(cfg.transformer.vocab_size, cfg.codec.eos)

    t0 = time.perf_counter()
    ctx = talker.model.contiguous_context(batch=1, capacity=prompt.prefill.shape[0] + max_frames)
    hidden = ctx.run(talker.model, prompt.prefill[None])[:, -1]  # [1, hidden]
    result = GenerationResult(codes=torch.empty(0, cfg.num_code_groups, dtype=torch.long), stop_reason="max_frames")
    result.prefill_seconds = time.perf_counter() - t0

    history: list[int] = []
    frames: list[list[int]] = []
    for g in range(max_frames):
        t0 = time.perf_counter()
        logits = talker.logits(hidden)[0]
        if trace is not None:
            trace.talker_logits.append(logits)
        logits = process(logits[None], [history], [params])
        c0 = int(draw_rows(logits, [talker_rule(params)], [generator])[0])
        t1 = time.perf_counter()
        result.talker_seconds += t1 - t0
        if c0 == cfg.codec.eos:
            result.stop_reason = "eos"
            break
        frame = [c0, *predict_residual_codes(talker, hidden, c0, params, generator, trace)]
        frames.append(frame)
        history.append(c0)
        t2 = time.perf_counter()
        result.predictor_seconds += t2 - t1
        if g + 1 == max_frames:
            break  # the cap: no talker step for a frame that will never be sampled
        x = talker.embed_frames(torch.tensor(frame, device=device))
        x = x + (prompt.trailing[g] if g < prompt.trailing.shape[0] else prompt.pad)
        hidden = ctx.run(talker.model, x[None, None])[:, -1]
        result.talker_seconds += time.perf_counter() - t2
    if frames:
        result.codes = torch.tensor(frames, dtype=torch.long)
    return result
