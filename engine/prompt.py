"""Prefill rows for a voice-cloning request (spec §4.2).

Each prompt row is the sum of a text-stream vector and a codec-stream vector. The result is
the prefill ``[L, hidden]`` plus the *trailing* text rows that are added, one per generated
frame, to the next talker input (after they run out, ``tts_pad`` is added instead).

Layouts:
- head: role rows ``<|im_start|>assistant\\n`` (text only), then PAD + think/nothink,
  PAD + think_bos, [PAD + language], PAD + think_eos, PAD + speaker vector, BOS + codec_pad.
- ICL (reference audio + transcript): text ``[ref ids + text ids, EOS]`` aligned with codec
  ``[codec_bos, F(ref frames)...]``; non-streaming puts all text first (each + codec_pad), then
  the codec part (each + PAD).
- x-vector only: first text token + codec_bos, the rest trails; non-streaming puts all text
  (+ codec_pad) and EOS in the prompt and ends with PAD + codec_bos.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig
from engine.models.talker import Talker
from engine.voice import VoicePrompt


class PromptError(ValueError):
    """A request that cannot be turned into a prompt (unknown language, missing transcript)."""


@dataclass
class Prompt:
    prefill: torch.Tensor  # [L, hidden]
    trailing: torch.Tensor  # [N, hidden]; row g is added to the input that follows frame g
    pad: torch.Tensor  # [hidden]: T(tts_pad), added once the trailing rows are used up

    @property
    def length(self) -> int:
        """Rows of the whole prompt (a live prompt knows this before it knows all of them)."""
        return self.prefill.shape[0]

    def trailing_row(self, frame_index: int) -> torch.Tensor | None:
        """The text row added to the input after frame ``frame_index`` (None: not known yet, live only)."""
        return self.trailing[frame_index] if frame_index < self.trailing.shape[0] else self.pad


def embed_text_rows(talker: Talker, ids: list[int]) -> torch.Tensor:
    """T(ids), one row per call: a GEMM's rounding depends on its row count (measured up to 8e-7 between
    a 60-row call and the same rows in smaller calls), and a live text arrives a few ids at a time, so
    both layouts embed every text id alone to get bitwise the same rows however the text was split."""
    device = talker.codec_head.weight.device
    return torch.cat([talker.embed_text(torch.tensor([i], dtype=torch.long, device=device)) for i in ids])


def language_id(cfg: ModelConfig, language: str) -> int | None:
    """The codec id of a language name, None for ``auto``."""
    name = language.strip().lower()
    if name == "auto":
        return None
    ids = cfg.talker.language_ids
    if name not in ids or "dialect" in name:
        choices = ", ".join(["auto", *sorted(k for k in ids if "dialect" not in k)])
        raise PromptError(f"unknown language {language!r}; choose one of: {choices}")
    return ids[name]


@dataclass
class PromptHead:
    rows: torch.Tensor  # [H, hidden]: role rows, then the codec head with PAD/BOS text
    eos: torch.Tensor
    pad: torch.Tensor
    codec_bos: torch.Tensor  # [1, hidden]
    codec_pad: torch.Tensor  # [1, hidden]


def prompt_head(talker: Talker, cfg: ModelConfig, role_ids: list[int], voice: VoicePrompt, language: str) -> PromptHead:
    """The rows every layout starts with, and the special embeddings the layouts use after them."""
    device = talker.codec_head.weight.device
    codec_ids, text_sp = cfg.talker.codec, cfg.text_ids
    lang = language_id(cfg, language)

    def ids(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    bos, eos, pad = talker.embed_text(ids([text_sp.tts_bos, text_sp.tts_eos, text_sp.tts_pad])).unbind(0)

    # Codec stream of the head; the speaker vector enters raw (no projection) as a codec row.
    tags = [codec_ids.nothink, codec_ids.think_bos, codec_ids.think_eos] if lang is None else \
        [codec_ids.think, codec_ids.think_bos, lang, codec_ids.think_eos]
    speaker = voice.speaker_embedding.to(device=device, dtype=pad.dtype)
    codec_head = torch.cat([talker.embed_codec(ids(tags)), speaker[None],
                            talker.embed_codec(ids([codec_ids.pad]))])
    text_head = torch.cat([pad.expand(codec_head.shape[0] - 1, -1), bos[None]])
    rows = torch.cat([talker.embed_text(ids(role_ids)), text_head + codec_head])
    codec_bos, codec_pad = talker.embed_codec(ids([codec_ids.bos, codec_ids.pad])).split(1)
    return PromptHead(rows, eos, pad, codec_bos, codec_pad)


@torch.inference_mode()
def build_prompt(talker: Talker, cfg: ModelConfig, role_ids: list[int], text_ids: list[int],
                 voice: VoicePrompt, language: str, non_streaming_text: bool = False) -> Prompt:
    if not text_ids:
        raise PromptError("text is empty")
    device = talker.codec_head.weight.device
    head = prompt_head(talker, cfg, role_ids, voice, language)
    eos, pad, codec_bos, codec_pad = head.eos, head.pad, head.codec_bos, head.codec_pad
    rows = [head.rows]

    if voice.is_icl:
        if not voice.ref_text_ids:
            raise PromptError("ICL voice prompt without reference transcript")
        text = torch.cat([embed_text_rows(talker, voice.ref_text_ids + text_ids), eos[None]])
        codec = torch.cat([codec_bos, talker.embed_frames(voice.ref_codes.to(device))])
        if non_streaming_text:
            rows += [text + codec_pad, codec + pad]
            trailing = pad[None]
        elif text.shape[0] > codec.shape[0]:
            rows.append(text[: codec.shape[0]] + codec)
            trailing = text[codec.shape[0]:]
        else:
            rows.append(torch.cat([text, pad.expand(codec.shape[0] - text.shape[0], -1)]) + codec)
            trailing = pad[None]
    else:
        text = embed_text_rows(talker, text_ids)
        if non_streaming_text:
            rows += [torch.cat([text, eos[None]]) + codec_pad, pad[None] + codec_bos]
            trailing = pad[None]
        else:
            rows.append(text[:1] + codec_bos)
            trailing = torch.cat([text[1:], eos[None]])
    return Prompt(prefill=torch.cat(rows), trailing=trailing, pad=pad)
