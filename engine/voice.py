"""A voice prompt: what one reference voice contributes to every prompt that uses it.

Computed once per voice (speaker encoder + codec encoder + tokenizer) and reused by every
request: the x-vector, and for ICL cloning the reference codes and reference transcript ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class VoicePrompt:
    speaker_embedding: torch.Tensor  # [talker hidden], fp32
    ref_codes: torch.Tensor | None = None  # [T_ref, 16] int64, ICL only
    ref_text_ids: list[int] | None = None  # reference transcript ids, ICL only

    @property
    def is_icl(self) -> bool:
        return self.ref_codes is not None

    def save(self, path: str | Path) -> None:
        """``voice.safetensors``: tensors, with the transcript ids in the metadata."""
        tensors = {"speaker_embedding": self.speaker_embedding.detach().float().cpu().contiguous()}
        if self.ref_codes is not None:
            tensors["ref_codes"] = self.ref_codes.detach().to(torch.int64).cpu().contiguous()
        save_file(tensors, str(path), metadata={"ref_text_ids": json.dumps(self.ref_text_ids)})

    @classmethod
    def load(cls, path: str | Path) -> VoicePrompt:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        return cls(speaker_embedding=tensors["speaker_embedding"], ref_codes=tensors.get("ref_codes"),
                   ref_text_ids=json.loads(meta.get("ref_text_ids", "null")))
