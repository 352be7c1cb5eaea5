"""Teacher-forced replay: the logits a model gives at every decision of a fixed code trajectory.

Free-running greedy decodes of two precisions part at the first differing code and never meet
again (each later frame sees another history), so comparing them measures luck. Replaying one
trajectory (fp32's greedy codes) through each model instead compares every one of the
``frames x 16`` decisions on the same history: its logits, and whether its argmax is fp32's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model import TTSModel
from engine.prompt import build_prompt
from engine.sampling import TalkerLogitsProcessor
from engine.voice import VoicePrompt

TEXT = "The quick brown fox jumps over the lazy dog near the quiet river bank, twice over."


@dataclass
class Replay:
    talker_logits: torch.Tensor  # [frames, vocab] fp32, raw
    talker_processed: torch.Tensor  # the same after the talker's logits processor (what greedy reads), EOS off
    predictor_logits: torch.Tensor  # [frames, 15, vocab] fp32
    codes: torch.Tensor  # [frames, 16]: each decision's greedy pick on the forced history


def voice_for(model: TTSModel) -> VoicePrompt:
    gen = torch.Generator().manual_seed(0)
    return VoicePrompt(speaker_embedding=torch.randn(model.cfg.speaker_encoder.enc_dim, generator=gen))


@torch.inference_mode()
def replay(model: TTSModel, forced: torch.Tensor | None, frames: int) -> Replay:
    """Logits along ``forced`` codes [frames, 16]; with ``forced`` None, greedy free-running (the
    trajectory itself), EOS suppressed so every run is ``frames`` long."""
    talker, cfg = model.tts.talker, model.cfg
    text_ids = model.tokenizer.target_ids(TEXT)
    prompt = build_prompt(talker, cfg, model.tokenizer.role_ids(), text_ids, voice_for(model), "english")
    process = TalkerLogitsProcessor(cfg.talker.transformer.vocab_size, cfg.talker.codec.eos)
    ctx = talker.model.contiguous_context(batch=1, capacity=prompt.prefill.shape[0] + frames)
    hidden = ctx.run(talker.model, prompt.prefill[None])[:, -1]
    t_logits, t_processed, p_logits, picks, history = [], [], [], [], []
    greedy = model.sampling(greedy=True)
    predictor = talker.code_predictor
    for g in range(frames):
        raw = talker.logits(hidden)[0]
        processed = process(raw[None], [history], [greedy])[0]
        processed[cfg.talker.codec.eos] = float("-inf")
        pick = [int(processed.argmax())]
        frame = [pick[0] if forced is None else int(forced[g, 0])]
        pctx = predictor.new_context(batch=1)
        x = torch.stack([hidden, talker.embed_codec(torch.tensor([frame[0]]))], dim=1)
        frame_logits = []
        for j in range(predictor.num_residual_codebooks):
            logits = predictor.step(x, pctx, head=j)[0]
            frame_logits.append(logits)
            pick.append(int(logits.argmax()))
            frame.append(pick[-1] if forced is None else int(forced[g, j + 1]))
            if j + 1 < predictor.num_residual_codebooks:
                x = predictor.model.codec_embedding[j](torch.tensor([[frame[-1]]]))
        t_logits.append(raw)
        t_processed.append(processed)
        p_logits.append(torch.stack(frame_logits))
        picks.append(pick)
        history.append(frame[0])
        x = talker.embed_frames(torch.tensor(frame)) + (prompt.trailing[g] if g < prompt.trailing.shape[0]
                                                         else prompt.pad)
        hidden = ctx.run(talker.model, x[None, None])[:, -1]
    return Replay(torch.stack(t_logits), torch.stack(t_processed), torch.stack(p_logits), torch.tensor(picks))
