"""The streaming-text prompt (spec §4.2) of a request whose text is still arriving.

Both streaming layouts put a text stream ``S = [ref ids (ICL only) + text ids, EOS, PAD, PAD, ...]``
beside a codec stream, one text row per position, starting at the codec-BOS row:

- ICL: the prompt ends with ``n_c = 1 + T_ref`` rows ``C(codec_bos), F(ref frames)...``, row j
  carrying ``S[j]``; the input after frame g carries ``S[n_c + g]``;
- x-vector only: the prompt ends with the one row ``C(codec_bos) + S[0]``; after frame g, ``S[1 + g]``.

So the prompt's length never depends on the text, only which of its rows are known does: row j
is known once ``S[j]`` is (an id has arrived, or the text has ended and j is its EOS or a PAD).
Nothing here ever stands in for text that has not come: an unknown row is ``None`` and the
request waits for it. With the whole text given at once this builds exactly ``build_prompt``'s rows.

First audio in live mode: frame 0 is sampled once the prompt is complete and the text row that
joins its input (``S[n_c]``) is known, so an x-vector voice needs the first two text ids and an ICL
voice ``n_c + 1 - |ref ids|`` = ``T_ref + 2 - |ref ids|`` ids of the new text (or the end of the
text), since the reference audio frames carry the text that follows the transcript.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.models.talker import Talker
from engine.prompt import PromptError, embed_text_rows, prompt_head
from engine.voice import VoicePrompt


class LivePrompt:
    """Same interface as ``Prompt`` (``prefill``, ``length``, ``trailing_row``, ``pad``), growing."""

    def __init__(self, talker: Talker, cfg: ModelConfig, role_ids: list[int], voice: VoicePrompt | None,
                 language: str, speaker: str | None = None, instruct_ids: list[int] | None = None) -> None:
        head = prompt_head(talker, cfg, role_ids, voice, language, speaker, instruct_ids)
        self._talker = talker
        self.pad, self._eos, self._head_rows = head.pad, head.eos, head.rows
        self._text: list[torch.Tensor] = []  # T(S[i]) for the ids known so far
        self._num_ref = 0
        codec = [head.codec_bos]
        if voice is not None and voice.is_icl:
            if not voice.ref_text_ids:
                raise PromptError("ICL voice prompt without reference transcript")
            codec.append(talker.embed_frames(voice.ref_codes.to(head.pad.device)))
            self._num_ref = len(voice.ref_text_ids)
            self._text += list(embed_text_rows(talker, voice.ref_text_ids))
        self._codec = torch.cat(codec)  # [n_c, hidden]: the rows the text stream aligns with
        self.ended = False
        self.length = head.rows.shape[0] + self._codec.shape[0]
        self.prefill = self._known_rows()

    def extend(self, ids: list[int]) -> None:
        """More text ids have become final."""
        if self.ended:
            raise PromptError("the text has already ended")
        if ids:
            self._text += list(embed_text_rows(self._talker, ids))
            self.prefill = self._known_rows()

    def end(self) -> None:
        if len(self._text) == self._num_ref:
            raise PromptError("text is empty")
        self.ended = True
        self.prefill = self._known_rows()

    def _text_row(self, index: int) -> torch.Tensor | None:
        if index < len(self._text):
            return self._text[index]
        if not self.ended:
            return None  # not arrived: never PAD or EOS in its place
        return self._eos if index == len(self._text) else self.pad

    def trailing_row(self, frame_index: int) -> torch.Tensor | None:
        return self._text_row(self._codec.shape[0] + frame_index)

    def _known_rows(self) -> torch.Tensor:
        rows = [self._head_rows]
        for j in range(self._codec.shape[0]):
            text = self._text_row(j)
            if text is None:
                break
            rows.append((self._codec[j] + text)[None])
        return torch.cat(rows)
