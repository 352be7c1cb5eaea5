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
import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Literal prompt strings of the official wrapper: the target text and the reference transcript.
TARGET_TEMPLATE = "<|im_start|>assistant\n{text}<|im_end|>\n<|im_start|>assistant\n"
REF_TEMPLATE = "<|im_start|>assistant\n{text}<|im_end|>\n"


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

    def role_ids(self) -> list[int]:
        """``<|im_start|>assistant\\n``: the three rows that open every prompt."""
        return self.encode("<|im_start|>assistant\n")


class LiveText:
    """Text that arrives in pieces, turned into ids only where more text can no longer change them.

    The ids of the whole text are the official ``encode(TARGET_TEMPLATE.format(text))[3:-5]``;
    this class hands them out as a growing prefix. After each piece the whole text so far is
    normalised and encoded again (one Rust call; texts are bounded by the server's limits), and the
    tokens that end before the *unstable tail* are committed. The tail starts at the earlier of:

    - the last pre-token holding a non-space character: a split-regex match is decided by the text
      up to the first non-space character after it (a whitespace run can still gain a newline that
      re-splits it; letters, digits and punctuation runs stop at a character already present), so
      every match before that pre-token is final, and it itself may still grow;
    - the pre-token holding the last NFC starter (combining class 0): a combining mark sent later
      may compose with that starter (``e`` + U+0301 is ``é``), never with an earlier one.

    ``end`` commits the rest as ``target_ids`` of the whole text, so the final ids are exactly the
    ids of the text sent whole; ``committed`` only ever grows.
    """

    _ROLE_TOKENS = 3  # <|im_start|> assistant \n: the official slice [3:] drops them

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.committed: list[int] = []
        self.ended = False

    def append(self, piece: str) -> list[int]:
        """Add text; return the ids this piece made final (possibly none)."""
        if self.ended:
            raise TextError("the text has already ended")
        text = self.text + piece
        for token in self.tokenizer.special_tokens:
            if token in text:  # checked on the whole text: a token may arrive split over pieces
                raise TextError(f"text contains the reserved token {token!r}")
        self.text = text
        return self._commit(self._stable_ids())

    def end(self) -> list[int]:
        """No more text: commit everything; return the ids that were still pending."""
        final = self.tokenizer.target_ids(self.text)  # raises TextError on an empty text
        if final[:len(self.committed)] != self.committed:
            raise AssertionError("live tokenisation committed ids the whole text does not have")
        self.ended = True
        return self._commit(final)

    def _commit(self, ids: list[int]) -> list[int]:
        new = ids[len(self.committed):]
        self.committed.extend(new)
        return new

    def _stable_ids(self) -> list[int]:
        tok = self.tokenizer._tok
        head = "<|im_start|>"
        segment = "assistant\n" + tok.normalizer.normalize_str(self.text)  # what the pre-tokenizer sees
        pieces = tok.pre_tokenizer.pre_tokenize_str(segment)
        starts = [start for _, (start, _) in pieces]
        tail = len(segment)
        for _, (start, end) in reversed(pieces):
            if not segment[start:end].isspace():
                tail = start
                break
        last_starter = next((i for i in range(len(segment) - 1, -1, -1) if not unicodedata.combining(segment[i])), 0)
        tail = min(tail, max(s for s in starts if s <= last_starter))
        encoding = tok.encode(head + segment, add_special_tokens=False)
        limit = len(head) + tail
        stable = [i for i, (_, end) in zip(encoding.ids, encoding.offsets, strict=True) if end <= limit]
        return stable[self._ROLE_TOKENS:]
