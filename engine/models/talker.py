"""The talker: a Qwen3 stack that reads text and codec embeddings and predicts codebook 0.

Module names follow the checkpoint (``talker.model.*``, ``talker.text_projection.*``,
``talker.codec_head``, ``talker.code_predictor.*``) so the safetensors load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig, TalkerConfig
from engine.models.code_predictor import CodePredictor
from engine.models.cpu_linear import AnyProjection, make_projection
from engine.models.qwen3 import Qwen3Stack


class TalkerModel(Qwen3Stack):
    """The decoder stack plus the two embedding tables that feed it."""

    def __init__(self, cfg: TalkerConfig) -> None:
        super().__init__(cfg.transformer)
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_hidden_size)
        self.codec_embedding = nn.Embedding(cfg.transformer.vocab_size, cfg.transformer.hidden_size)


class TextProjection(nn.Module):
    """``fc2(silu(fc1(x)))``: text-embedding width → talker width (spec §1.2)."""

    def __init__(self, text_hidden: int, hidden: int) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(text_hidden, text_hidden, bias=True)
        self.linear_fc2 = nn.Linear(text_hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class Talker(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg.talker
        t = cfg.talker.transformer
        self.model = TalkerModel(cfg.talker)
        self.text_projection = TextProjection(cfg.talker.text_hidden_size, t.hidden_size)
        self.codec_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor, talker_hidden=t.hidden_size)
        self.codec_logits: AnyProjection | None = None  # codec_head as a projection, set by fuse_weights_

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """T(ids): text ids → projected talker-width vectors."""
        return self.text_projection(self.model.text_embedding(ids))

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """C(ids): codebook-0 codes and control tokens → talker-width vectors."""
        return self.model.codec_embedding(ids)

    def embed_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """F(frame): the sum of a frame's 16 code embeddings. codes: [..., 16] → [..., hidden]."""
        out = self.model.codec_embedding(codes[..., 0])
        for j, table in enumerate(self.code_predictor.model.codec_embedding):
            out = out + table(codes[..., j + 1])
        return out

    def fuse_weights_(self, weights: str = "fp32") -> None:
        """Pack every projection of both stacks and the heads in weight format ``weights``."""
        self.model.fuse_weights_(weights)
        self.code_predictor.model.fuse_weights_(weights)
        # The heads keep the checkpoint's [out, in] layout (pack_linears would store them input-major):
        # they are 2 % of the bytes a frame reads, and no faster input-major was measured in the model.
        self.codec_logits = make_projection(self.codec_head.weight, weights)
        self.code_predictor.head_logits = [make_projection(h.weight, weights) for h in self.code_predictor.lm_head]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Codebook-0 (+control) logits, always fp32."""
        return self.codec_logits(hidden, many_sequences=hidden.shape[0] > 1).float()
