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


class LiveText:
    """Text that arrives in pieces, turned into ids only where more text can no longer change them.

    The ids of the whole text are the official ``encode(TARGET_TEMPLATE.format(text))[3:-5]``;
    this class hands them out as a growing prefix. After each piece the *unstable tail* of the
    normalised text is encoded again, and the tokens that end before the new unstable tail are
    committed. The tail starts at the earlier of:

    - the last pre-token holding a non-space character: a split-regex match is decided by the text
      up to the first non-space character after it (a whitespace run can still gain a newline that
      re-splits it; letters, digits and punctuation runs stop at a character already present), so
      every match before that pre-token is final, and it itself may still grow;
    - the pre-token holding the last NFC starter (combining class 0): a combining mark sent later
      may compose with that starter (``e`` + U+0301 is ``é``), never with an earlier one.

    Only the tail is encoded again (so an append costs its own length, not the text's): the split
    regex has no look-behind, so matching from a pre-token boundary does not depend on what is
    before it, and NFC(final prefix + tail + piece) = final prefix + NFC(tail + piece) because no
    later character composes across the last starter. Until the three role tokens of the template
    are final, the tail is encoded behind ``<|im_start|>assistant\n`` as the official prompt has it
    (a text that starts with newlines merges them with the role's). ``end`` commits the rest as
    ``target_ids`` of the whole text, so the final ids are exactly those of the text sent whole.
    """

    _ROLE = "assistant\n"  # the segment after <|im_start|> that the text continues
    _ROLE_TOKENS = 3  # <|im_start|> assistant \n: the official slice [3:] drops them

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.committed: list[int] = []
        self.ended = False
        self._stable: list[int] = []  # final tokens of the whole template so far, role tokens included
        self._tail = self._ROLE  # the normalised segment text after the final tokens

    def append(self, piece: str) -> list[int]:
        """Add text; return the ids this piece made final (possibly none)."""
        if self.ended:
            raise TextError("the text has already ended")
        text = self.text + piece
        for token in self.tokenizer.special_tokens:
            if token in text:  # checked on the whole text: a token may arrive split over pieces
                raise TextError(f"text contains the reserved token {token!r}")
        self.text = text
        self._tail = self.tokenizer._tok.normalizer.normalize_str(self._tail + piece)
        self._advance()
        return self._commit(self._stable[self._ROLE_TOKENS:])

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

    def _advance(self) -> None:
        """Move the tokens of the tail that can no longer change into ``_stable``."""
        tok = self.tokenizer._tok
        tail = self._tail
        pieces = tok.pre_tokenizer.pre_tokenize_str(tail)
        cut = len(tail)
        for _, (start, end) in reversed(pieces):
            if not tail[start:end].isspace():
                cut = start
                break
        last_starter = next((i for i in range(len(tail) - 1, -1, -1) if not unicodedata.combining(tail[i])), 0)
        cut = min(cut, max((start for _, (start, _) in pieces if start <= last_starter), default=0))
        head = "<|im_start|>" if len(self._stable) < self._ROLE_TOKENS else ""
        encoding = tok.encode(head + tail, add_special_tokens=False)
        stable = [i for i, (_, end) in zip(encoding.ids, encoding.offsets, strict=True) if end <= len(head) + cut]
        if head and len(stable) < self._ROLE_TOKENS:
            return  # the role tokens are not final yet: keep encoding from the template's start
        self._stable += stable
        self._tail = tail[cut:]
