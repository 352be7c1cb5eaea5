"""Write a random checkpoint directory in exactly the layout of the real release.

No weights can be downloaded on our machines, so tests and benchmarks run on checkpoints we
generate: ``tiny*`` (seconds to load, for tests and parity fixtures) and the release variants
(``0.6b-base``, ``1.7b-custom-voice``, ...: the real shapes, ``model.safetensors`` in bf16 like the
real file, ``speech_tokenizer/`` in fp32). The
tensor list comes from our own modules built on the meta device, so it is exactly what the
loader expects, and the key tests pin those modules to the official key lists.

Values are random but shaped like trained weights where it matters: norms near 1, codebook
usage counts positive, layer scales small, weights ~ N(0, 1/fan_in). Each tensor is drawn from
its own generator seeded by (seed, key), so the result does not depend on iteration order.
"""

from __future__ import annotations

import json
import shutil
import zlib
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.checkpoint import build_on_meta
from engine.config import ModelConfig
from engine.models.qwen3_tts import Qwen3TTS
from engine.models.speech_tokenizer import SpeechTokenizer
from engine.presets import PRESETS
from engine.random_tokenizer import write_qwen2_tokenizer, write_tiny_tokenizer

SPEECH_TOKENIZER_PREPROCESSOR = {
    "chunk_length_s": None, "feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1,
    "overlap": None, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
    "sampling_rate": 24000,
}


def random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float32 tensor for checkpoint key ``key``, deterministic in (seed, key)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    name = key.rsplit(".", 1)[-1]

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    if name == "cluster_usage":
        return torch.rand(shape, generator=g) + 0.5
    if name == "initialized":
        return torch.ones(shape)
    if name in ("embed_sum", "embedding_sum"):
        return normal(1.0)
    if name in ("alpha", "beta"):  # SnakeBeta, log scale
        return normal(0.1)
    if name in ("scale", "gamma"):  # LayerScale / ConvNeXt gamma
        return normal(0.02, mean=0.1)
    if name == "bias":
        return normal(0.02)
    if len(shape) == 1:  # RMSNorm / LayerNorm weights
        return normal(0.1, mean=1.0)
    if "embedding." in key:  # text / codec embedding tables
        return normal(1.0)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    std = fan_in ** -0.5
    # Random residual stacks in the vocoder double the signal per block; damp the residual branches
    # and the output conv so random audio sits well below full scale instead of clipping (a clipped,
    # high-gain decoder would turn float rounding into audible differences).
    if key.startswith("decoder.decoder.") and key.endswith("conv2.conv.weight"):
        std *= 0.3
    if key == "decoder.decoder.6.conv.weight":
        std *= 0.15
    return normal(std)


def _preset_file(preset: str, name: str) -> dict:
    return json.loads(resources.files("engine").joinpath("presets", preset, name).read_text())


def _write_weights(module: torch.nn.Module, path: Path, seed: int, dtype: torch.dtype) -> int:
    tensors = {}
    for key, meta in module.state_dict().items():
        tensors[key] = random_tensor(key, tuple(meta.shape), seed).to(dtype).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() for t in tensors.values())


def make_random_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write ``out/`` with config files, tokenizer files, ``model.safetensors`` and
    ``speech_tokenizer/``; returns the directory. It is written next to ``out`` and moved into
    place at the end, so a failure (no Qwen2 vocabulary installed, a full disk) leaves no
    half-written checkpoint behind, and an existing ``out`` is replaced only by a whole one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    root = Path(out)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_checkpoint(partial, preset, seed)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    return root


def _write_checkpoint(root: Path, preset: str, seed: int) -> None:
    (root / "speech_tokenizer").mkdir(parents=True)

    family = PRESETS[preset]
    text_ids = write_tiny_tokenizer(root) if family == "tiny" else write_qwen2_tokenizer(root)
    config = _preset_file(preset, "config.json")
    for key, value in text_ids.items():
        if config[key] != value:
            raise AssertionError(f"preset {preset}: config {key}={config[key]} but the vocabulary gives {value}")
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "generation_config.json").write_text(json.dumps(_preset_file(family, "generation_config.json"),
                                                            indent=2))
    (root / "speech_tokenizer" / "config.json").write_text(
        json.dumps(_preset_file(family, "speech_tokenizer_config.json"), indent=2))
    (root / "speech_tokenizer" / "preprocessor_config.json").write_text(
        json.dumps(SPEECH_TOKENIZER_PREPROCESSOR, indent=2))

    cfg = ModelConfig.from_dir(root)
    # The real model.safetensors is bf16, the speech tokenizer fp32; tiny stays fp32 so that the
    # parity tests compare the networks, not bf16 rounding.
    model_dtype = torch.float32 if family == "tiny" else torch.bfloat16
    _write_weights(build_on_meta(lambda: Qwen3TTS(cfg)), root / "model.safetensors", seed, model_dtype)
    _write_weights(build_on_meta(lambda: SpeechTokenizer(cfg.speech_tokenizer)),
                   root / "speech_tokenizer" / "model.safetensors", seed + 1, torch.float32)
