"""One live utterance: text that keeps arriving (an LLM's tokens) spoken as a single request.

The engine turns the text into audio as it comes (``Request.live``, ``append_text``, ``end_text``)
and its audio equals that of the whole text sent at once. Text that arrives before the utterance's
turn is kept here; at its turn it becomes the request's initial text, and if the text has already
ended by then the request is an ordinary whole-text one.

Ordering: an engine admits a request when its stream is first iterated, so ``bind`` must be called
right before that first iteration with no ``await`` in between (asyncio runs nothing else meanwhile):
every ``append_text`` then reaches the engine after the request it belongs to.
"""

from __future__ import annotations

from engine.api import Request, TTSEngine
from server import protocol as P


class LiveUtterance:
    def __init__(self, text: str, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = len(text)
        self.pending = [text]  # text not yet handed to the engine
        self.ended = False
        self._engine: TTSEngine | None = None
        self._request_id: str | None = None

    def append(self, text: str, id: str | int | None) -> None:
        if self.chars + len(text) > self.max_chars:
            raise P.ProtocolError(P.TEXT_TOO_LONG, f"the live utterance would pass {self.max_chars} characters; "
                                                   "end it and open another", id)
        self.chars += len(text)
        if self._engine is not None:
            self._engine.append_text(self._request_id, text)
        else:
            self.pending.append(text)

    def end(self) -> None:
        self.ended = True
        if self._engine is not None:
            self._engine.end_text(self._request_id)

    def bind(self, engine: TTSEngine, request: Request) -> None:
        """At the utterance's turn: the text so far goes into ``request``; later text goes to the engine."""
        request.text, self.pending = "".join(self.pending), []
        request.live = not self.ended
        if request.live:
            self._engine, self._request_id = engine, request.request_id
