"""Find a checkpoint (local directory or hub id) and load safetensors into modules, strictly.

Modules are built on the meta device and their tensors are materialised straight from the file
on the target device and dtype, so a 0.6B model never exists twice in memory. Any missing
tensor, unused tensor or wrong shape is an error that lists them all: a silently half-loaded
model produces plausible noise, which is the worst failure a TTS server can have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"
CHECKPOINT_FILES = ["config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
                    "tokenizer_config.json", "speech_tokenizer/config.json",
                    "speech_tokenizer/model.safetensors"]


class CheckpointError(RuntimeError):
    """The model cannot be found, fetched or loaded."""


def resolve_model(model: str) -> Path:
    """A local checkpoint directory as is; anything else is a hub id fetched (or found in the
    local cache) with ``huggingface_hub``, which honours ``HF_HUB_OFFLINE`` and shows progress."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path} is not a Qwen3-TTS checkpoint directory: missing {', '.join(missing)}")
        return path
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") != 1
    if path.exists() or looks_like_path:
        raise CheckpointError(f"model {model!r} is not a checkpoint directory (hub ids look like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model))
    except Exception as e:  # network down, offline mode without cache, unknown repo, ...
        raise CheckpointError(
            f"could not fetch model {model!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Download it elsewhere and pass the directory with --model PATH") from e


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def load_strict(module: nn.Module, path: str | Path, device: torch.device | str,
                dtype: torch.dtype) -> nn.Module:
    """Fill a (meta) module from one safetensors file; floating tensors are cast to ``dtype``."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    mismatched.append(f"{key}: file {list(shape)} vs model {list(expected[key])}")
                    continue
                t = f.get_tensor(key)
                state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # unreadable or not safetensors
        raise CheckpointError(f"cannot read {path}: {e}") from e
    missing = sorted(set(expected) - set(state) - {m.split(":")[0] for m in mismatched})
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", sorted(unexpected)),
                             ("wrong shape", mismatched)):
            if items:
                shown = "\n    ".join(items[:20]) + (f"\n    ... {len(items) - 20} more" if len(items) > 20 else "")
                parts.append(f"  {len(items)} {label}:\n    {shown}")
        raise CheckpointError(f"{path} does not match the model:\n" + "\n".join(parts))
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)
