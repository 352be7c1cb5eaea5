"""Prefill rows for a request (spec §4.2), for every model variant.

Each prompt row is the sum of a text-stream vector and a codec-stream vector. The result is
the prefill ``[L, hidden]`` plus the *trailing* text rows that are added, one per generated
frame, to the next talker input (after they run out, ``tts_pad`` is added instead).

Layouts:
- instruction (CustomVoice 1.7B, VoiceDesign): ``<|im_start|>user\\n{instruct}<|im_end|>\\n``,
  text only, before everything else.
- head: role rows ``<|im_start|>assistant\\n`` (text only), then PAD + think/nothink,
  PAD + think_bos, [PAD + language], PAD + think_eos, [PAD + speaker], BOS + codec_pad. The
  speaker row is the cloned x-vector (Base), the speaker's own codec row ``spk_id`` (CustomVoice),
  or absent (VoiceDesign). A dialect speaker asked for Chinese or auto speaks its dialect: the
  language row becomes the dialect's.
- ICL (reference audio + transcript): text ``[ref ids + text ids, EOS]`` aligned with codec
  ``[codec_bos, F(ref frames)...]``; non-streaming puts all text first (each + codec_pad), then
  the codec part (each + PAD).
- anything else: first text token + codec_bos, the rest trails; non-streaming puts all text
  (+ codec_pad) and EOS in the prompt and ends with PAD + codec_bos.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.api import EngineError
from engine.config import ModelConfig
from engine.models.talker import Talker
from engine.voice import VoicePrompt


class PromptError(ValueError):
    """A request that cannot be turned into a prompt (unknown language, missing transcript)."""


class UnsupportedByModel(EngineError, PromptError):
    """A request the loaded model variant cannot serve; the message names what it offers.

    Codes: ``UNSUPPORTED_BY_MODEL`` (a clone voice, speaker or instruction the variant has no use
    for), ``UNKNOWN_SPEAKER``, ``VOICE_REQUIRED`` (Base without a voice, CustomVoice without a speaker).
    """


def offer(cfg: ModelConfig) -> str:
    """What the model variant serves, in words, for every refusal to quote."""
    if cfg.model_type == "base":
        return "this Base model clones a voice from reference audio and takes no instruction"
    if cfg.model_type == "custom_voice":
        how = "and an optional instruction" if cfg.takes_instructions else "(this 0.6B model takes no instruction)"
        return f"this CustomVoice model speaks as one of its speakers ({', '.join(cfg.speakers)}) {how}"
    return "this VoiceDesign model makes a voice from an instruction; it has no speakers and clones no voice"


def check_request_fits(cfg: ModelConfig, clone: bool, speaker: str | None, instruct: bool) -> None:
    """Refuse, with a coded error naming what the model offers, what its variant cannot do.
    ``clone``: the request brings a voice to clone; ``instruct``: it brings an instruction."""
    kind = cfg.model_type
    if clone and kind != "base":
        raise UnsupportedByModel("UNSUPPORTED_BY_MODEL", f"cannot clone a voice: {offer(cfg)}")
    if speaker is not None and kind != "custom_voice":
        raise UnsupportedByModel("UNSUPPORTED_BY_MODEL", f"no built-in speaker {speaker!r}: {offer(cfg)}")
    if instruct and not cfg.takes_instructions:
        raise UnsupportedByModel("UNSUPPORTED_BY_MODEL", f"cannot follow an instruction: {offer(cfg)}")
    if kind == "base" and not clone:
        raise UnsupportedByModel("VOICE_REQUIRED", f"a voice is required: {offer(cfg)}")
    if kind == "custom_voice":
        if speaker is None:
            raise UnsupportedByModel("VOICE_REQUIRED", f"a speaker is required: {offer(cfg)}")
        if speaker.lower() not in cfg.talker.speaker_ids:
            raise UnsupportedByModel("UNKNOWN_SPEAKER", f"unknown speaker {speaker!r}: {offer(cfg)}")


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
    rows: torch.Tensor  # [H, hidden]: instruction rows, role rows, then the codec head with PAD/BOS text
    eos: torch.Tensor
    pad: torch.Tensor
    codec_bos: torch.Tensor  # [1, hidden]
    codec_pad: torch.Tensor  # [1, hidden]


def prompt_head(talker: Talker, cfg: ModelConfig, role_ids: list[int], voice: VoicePrompt | None, language: str,
                speaker: str | None = None, instruct_ids: list[int] | None = None) -> PromptHead:
    """The rows every layout starts with, and the special embeddings the layouts use after them.
    ``voice`` is a Base model's clone, ``speaker`` a CustomVoice name, ``instruct_ids`` the tokenised
    instruction block (TextTokenizer.instruct_ids); check_request_fits says which apply."""
    check_request_fits(cfg, voice is not None, speaker, bool(instruct_ids))
    device = talker.codec_head.weight.device
    codec_ids, text_sp = cfg.talker.codec, cfg.text_ids
    lang = language_id(cfg, language)
    speaker = speaker.lower() if speaker is not None else None
    dialect = cfg.talker.speaker_dialects.get(speaker) if speaker is not None else None
    if dialect is not None and language.strip().lower() in ("chinese", "auto"):
        lang = cfg.talker.language_ids[dialect]

    def ids(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    bos, eos, pad = talker.embed_text(ids([text_sp.tts_bos, text_sp.tts_eos, text_sp.tts_pad])).unbind(0)

    # Codec stream of the head; the speaker vector enters raw (no projection) as a codec row.
    tags = [codec_ids.nothink, codec_ids.think_bos, codec_ids.think_eos] if lang is None else \
        [codec_ids.think, codec_ids.think_bos, lang, codec_ids.think_eos]
    if voice is not None:
        speaker_rows = [voice.speaker_embedding.to(device=device, dtype=pad.dtype)[None]]
    elif speaker is not None:
        speaker_rows = [talker.embed_codec(ids([cfg.talker.speaker_ids[speaker]]))]
    else:
        speaker_rows = []
    codec_head = torch.cat([talker.embed_codec(ids(tags)), *speaker_rows, talker.embed_codec(ids([codec_ids.pad]))])
    text_head = torch.cat([pad.expand(codec_head.shape[0] - 1, -1), bos[None]])
    rows = [talker.embed_text(ids(instruct_ids))] if instruct_ids else []
    rows += [talker.embed_text(ids(role_ids)), text_head + codec_head]
    codec_bos, codec_pad = talker.embed_codec(ids([codec_ids.bos, codec_ids.pad])).split(1)
    return PromptHead(torch.cat(rows), eos, pad, codec_bos, codec_pad)


@torch.inference_mode()
def build_prompt(talker: Talker, cfg: ModelConfig, role_ids: list[int], text_ids: list[int],
                 voice: VoicePrompt | None, language: str, non_streaming_text: bool = False,
                 speaker: str | None = None, instruct_ids: list[int] | None = None) -> Prompt:
    """The whole prompt of a text known in full (``prompt_head`` says what ``voice``, ``speaker`` and
    ``instruct_ids`` are)."""
    if not text_ids:
        raise PromptError("text is empty")
    device = talker.codec_head.weight.device
    head = prompt_head(talker, cfg, role_ids, voice, language, speaker, instruct_ids)
    eos, pad, codec_bos, codec_pad = head.eos, head.pad, head.codec_bos, head.codec_pad
    rows = [head.rows]

    if voice is not None and voice.is_icl:
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
