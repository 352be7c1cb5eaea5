"""The code predictor: a 5-layer Qwen3 stack that fills in codebooks 1..15 of each frame.

Per frame it starts from a fresh cache with two rows, the talker's normed hidden state ``h``
and the embedding of the sampled codebook-0 id, then runs one cached step per residual
codebook; ``lm_head[j]`` predicts codebook ``j+1`` and ``codec_embedding[j]`` embeds it for the
next step (spec §1.3). The embedding tables are at the *talker* width; a projection maps them to
the predictor width when the two differ (1.7B; Identity, hence no weights, for 0.6B).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import CodePredictorConfig
from engine.models.cpu_linear import AnyProjection
from engine.models.qwen3 import ContiguousContext, Qwen3Stack


class CodePredictorModel(Qwen3Stack):
    def __init__(self, cfg: CodePredictorConfig, talker_hidden: int) -> None:
        super().__init__(cfg.transformer)
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.transformer.vocab_size, talker_hidden) for _ in range(cfg.num_code_groups - 1))


class CodePredictor(nn.Module):
    def __init__(self, cfg: CodePredictorConfig, talker_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.transformer.hidden_size
        self.model = CodePredictorModel(cfg, talker_hidden)
        self.lm_head = nn.ModuleList(
            nn.Linear(hidden, cfg.transformer.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1))
        self.head_logits: list[AnyProjection] = []  # lm_head as projections, set by Talker.fuse_weights_
        self.small_to_mtp_projection = (
            nn.Linear(talker_hidden, hidden, bias=True) if hidden != talker_hidden else nn.Identity())

    @property
    def num_residual_codebooks(self) -> int:
        return self.cfg.num_code_groups - 1

    def new_context(self, batch: int) -> ContiguousContext:
        """A fresh 16-position cache for one frame of ``batch`` sequences."""
        return self.model.contiguous_context(batch, capacity=self.cfg.num_code_groups)

    def step(self, x: torch.Tensor, ctx: ContiguousContext, head: int) -> torch.Tensor:
        """x: [B, S, talker_hidden] new rows → fp32 logits [B, vocab] of ``lm_head[head]``."""
        hidden = ctx.run(self.model, self.small_to_mtp_projection(x))
        return self.head_logits[head](hidden[:, -1], many_sequences=ctx.num_sequences > 1).float()
