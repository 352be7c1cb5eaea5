"""Shared test helpers: preset configs and the official key lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.config import ModelConfig

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PRESETS = Path(__file__).resolve().parents[2] / "engine" / "presets"


def preset_config(preset: str, tmp: Path) -> ModelConfig:
    """ModelConfig of a preset, through the same file parsing a checkpoint gets."""
    src = PRESETS / preset
    (tmp / "speech_tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", tmp / "config.json")
    shutil.copy(src / "generation_config.json", tmp / "generation_config.json")
    shutil.copy(src / "speech_tokenizer_config.json", tmp / "speech_tokenizer" / "config.json")
    return ModelConfig.from_dir(tmp)


def official_keys(name: str, prefix: str = "") -> dict[str, list[int]]:
    """key → shape from a fixture key list (tab-separated key, shape, numel; '#' comments)."""
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, _ = line.split("\t")
        if key.startswith(prefix):
            out[key] = json.loads(shape)
    return out
