"""The networks of ``model.safetensors``: the talker (with its code predictor) and, in a Base
checkpoint only, the speaker encoder (CustomVoice and VoiceDesign ship no weights for one). The
speech tokenizer lives in ``speech_tokenizer/`` and is loaded on its own."""

from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.models.speaker_encoder import SpeakerEncoder
from engine.models.talker import Talker


class Qwen3TTS(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.talker = Talker(cfg)
        self.speaker_encoder = SpeakerEncoder(cfg.speaker_encoder) if cfg.speaker_encoder is not None else None
