"""Shared test helpers: preset configs and the official key lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.config import ModelConfig
from engine.presets import PRESETS as PRESET_FAMILIES

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
PRESETS = Path(__file__).resolve().parents[2] / "engine" / "presets"


def preset_config(preset: str, tmp: Path) -> ModelConfig:
    """ModelConfig of a preset, through the same file parsing a checkpoint gets."""
    family = PRESETS / PRESET_FAMILIES[preset]  # the size's shared generation and tokenizer configs
    (tmp / "speech_tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copy(PRESETS / preset / "config.json", tmp / "config.json")
    shutil.copy(family / "generation_config.json", tmp / "generation_config.json")
    shutil.copy(family / "speech_tokenizer_config.json", tmp / "speech_tokenizer" / "config.json")
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
