"""Text side: the Qwen2 byte-level BPE tokenizer and the prompt strings of spec §4.1.

The checkpoint ships only the "slow" files (``vocab.json``, ``merges.txt``,
``tokenizer_config.json``), so the fast tokenizer is assembled here with the `tokenizers`
library: NFC normaliser, the Qwen2 split regex, byte-level BPE, and the added special tokens
listed in ``tokenizer_config.json``.

Note on parity: the official wrapper, loading a *local* checkpoint, swaps the Qwen2 split regex
for Mistral's (spec §6). We keep the Qwen2 regex, which the model was trained with; the two
differ only on mixed-case words (" iPhone").
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Literal prompt strings of the official wrapper: the target text and the reference transcript.
TARGET_TEMPLATE = "<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"
REF_TEMPLATE = "<|im_start|>assistant\n{text}<|im_end|>\n"
INSTRUCT_TEMPLATE = "<|im_start|>user\n{text}<|im_end|>\n"


class TextError(ValueError):
    """Text that cannot be turned into a prompt (empty, or smuggling special tokens)."""


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    return merges


class TextTokenizer:
    """Qwen2 BPE over the checkpoint's files, plus the slicing the prompt builder needs."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, int]) -> None:
        self._tok = tokenizer
        self.special_tokens = special_tokens

    @classmethod
    def from_dir(cls, path: str | Path) -> TextTokenizer:
        root = Path(path)
        vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))
        merges = _read_merges(root / "merges.txt")
        config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                                   byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        added = sorted(((int(i), d) for i, d in config.get("added_tokens_decoder", {}).items()),
                       key=lambda item: item[0])
        special: dict[str, int] = {}
        for token_id, d in added:
            tok.add_special_tokens([AddedToken(d["content"], special=True, normalized=False,
                                               lstrip=d.get("lstrip", False), rstrip=d.get("rstrip", False))])
            got = tok.token_to_id(d["content"])
            if got != token_id:
                raise ValueError(f"tokenizer_config.json: {d['content']!r} should be id {token_id}, "
                                 f"the vocabulary gives {got}")
            special[d["content"]] = token_id
        return cls(tok, special)

    def encode(self, text: str) -> list[int]:
        """Token ids of a string, special tokens recognised (as the official processor does)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _check_text(self, text: str, what: str) -> None:
        if not text or not text.strip():
            raise TextError(f"{what} is empty")
        for token in self.special_tokens:
            if token in text:
                raise TextError(f"{what} contains the reserved token {token!r}")

    def target_ids(self, text: str) -> list[int]:
        """Ids of the text to speak: the official ``ids[3:-5]`` of TARGET_TEMPLATE.

        The whole template is tokenised at once, as the official processor does, so that the
        split regex sees the same neighbours; then the fixed head and tail are cut off.
        """
        self._check_text(text, "text")
        ids = self.encode(TARGET_TEMPLATE.format(text=text))
        return ids[3:-5]

    def ref_ids(self, ref_text: str) -> list[int]:
        """Ids of a reference transcript: the official ``ids[3:-2]`` of REF_TEMPLATE."""
        self._check_text(ref_text, "reference transcript")
        ids = self.encode(REF_TEMPLATE.format(text=ref_text))
        return ids[3:-2]

    def instruct_ids(self, instruct: str | None) -> list[int] | None:
        """Ids of the whole INSTRUCT_TEMPLATE block, all of which the prompt embeds; None (no
        instruction) for None or "", as the official wrapper treats an empty instruction."""
        if not instruct:
            return None
        self._check_text(instruct, "instruction")
        return self.encode(INSTRUCT_TEMPLATE.format(text=instruct))

    def role_ids(self) -> list[int]:
        """``<|im_start|>assistant\\n``: the three rows that open every prompt."""
        return self.encode("<|im_start|>assistant\n")
