"""Incremental text → sentences, for ``append``/``flush``: speak each sentence as soon as it is
complete, so an LLM's output starts playing before the LLM has finished.

A sentence ends at . ! ? ; … followed by whitespace (so "3.14" and "e.g.x" do not split until
the next character shows it), at CJK full stops which need no space, or at a newline. A
run-on without any of these is cut at the last space or comma once it passes ``max_chars``.
"""

from __future__ import annotations

import re

# Western terminators need the following whitespace to be seen; CJK ones and newlines end at once.
_END = re.compile(r"[.!?;…]+[\"'”’)\]]*\s+|[。！？；]+[\"'”’」』）]*|\n+")


class SentenceBuffer:
    def __init__(self, max_chars: int = 300, min_chars: int = 12) -> None:
        self.max_chars = max_chars
        self.min_chars = min_chars  # "Hi. " alone is a poor utterance; merge tiny pieces forward
        self.text = ""

    def __len__(self) -> int:
        return len(self.text)

    def push(self, text: str) -> list[str]:
        """Add text; return the sentences it completed (possibly none)."""
        self.text += text
        out: list[str] = []
        start = 0
        for m in _END.finditer(self.text):
            if m.end() - start >= self.min_chars or m.group().strip() in ("\n", ""):
                piece = self.text[start:m.end()].strip()
                if piece:
                    out.append(piece)
                start = m.end()
        self.text = self.text[start:]
        while len(self.text) > self.max_chars:
            cut = max(self.text.rfind(" ", 0, self.max_chars), self.text.rfind(",", 0, self.max_chars))
            cut = cut + 1 if cut > 0 else self.max_chars
            out.append(self.text[:cut].strip())
            self.text = self.text[cut:]
        return [p for p in out if p]

    def flush(self) -> str | None:
        """Everything left, as one piece (None if only whitespace)."""
        rest, self.text = self.text.strip(), ""
        return rest or None

    def clear(self) -> None:
        self.text = ""
