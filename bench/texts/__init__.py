"""Text sets for ``makima-tts bench serve``: short, medium and long utterances in English and Chinese.

Each set is a file ``<lang>-<length>.txt`` beside this module, one utterance a line, ``#`` starts a
comment line. Sets are named by file stem (``en-short``), by length (``short`` = both languages), by
language (``en`` = every length), ``all``, or a comma list of those; any other value is read as a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SETS_DIR = Path(__file__).resolve().parent
LANGUAGES = ("en", "zh")
LENGTHS = ("short", "medium", "long")


@dataclass(frozen=True)
class Text:
    id: str  # "<set>:<line number>", so a slow utterance in the report can be found in its file
    text: str


def read_text_file(path: Path, name: str | None = None) -> list[Text]:
    """One utterance a line; blank lines and ``#`` comments skipped."""
    name = name or path.stem
    lines = path.read_text(encoding="utf-8").splitlines()
    texts = [Text(f"{name}:{n}", line.strip()) for n, line in enumerate(lines, 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not texts:
        raise ValueError(f"text set {path}: no utterances in it")
    return texts


def _stems(name: str) -> list[str] | None:
    if name == "all":
        return [f"{lang}-{length}" for lang in LANGUAGES for length in LENGTHS]
    if name in LENGTHS:  # both languages, so a run exercises the Chinese path too
        return [f"{lang}-{name}" for lang in LANGUAGES]
    if name in LANGUAGES:
        return [f"{name}-{length}" for length in LENGTHS]
    if (SETS_DIR / f"{name}.txt").is_file():
        return [name]
    return None


def builtin_sets() -> list[str]:
    return sorted(p.stem for p in SETS_DIR.glob("*.txt"))


def load_texts(spec: str) -> list[Text]:
    """Texts for ``--texts``: built-in set names (comma-separated) or a file path."""
    texts: list[Text] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        stems = _stems(name)
        if stems is None:
            path = Path(name)
            if not path.is_file():
                raise ValueError(f"--texts {name}: neither a built-in set ({', '.join(builtin_sets())}, short, "
                                 f"medium, long, en, zh, all) nor a file")
            texts += read_text_file(path)
            continue
        for stem in stems:
            texts += read_text_file(SETS_DIR / f"{stem}.txt", stem)
    if not texts:
        raise ValueError("--texts: no text set given")
    return texts
