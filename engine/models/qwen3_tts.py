"""The networks of ``model.safetensors``: the talker (with its code predictor) and the speaker
encoder. The speech tokenizer lives in ``speech_tokenizer/`` and is loaded on its own."""

from __future__ import annotations

from torch import nn

from engine.config import ModelConfig
from engine.models.speaker_encoder import SpeakerEncoder
from engine.models.talker import Talker


class Qwen3TTS(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.talker = Talker(cfg)
        self.speaker_encoder = SpeakerEncoder(cfg.speaker_encoder)
