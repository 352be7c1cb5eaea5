"""One fuzz exchange with a live server, and the rule every answer must follow.

A client sends the fuzzed frames, then a sentinel message of an unknown type. The server must
answer within the time limit and in a coded way: JSON messages of known types, errors with a
known code, and either the sentinel's own UNSUPPORTED error (the session survived) or a close
with a protocol close code. Anything else (a hang, an unknown code, a bare disconnect) fails.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import aiohttp

from server import protocol as P

CODES = frozenset(v for k, v in vars(P).items() if k.isupper() and isinstance(v, str) and v == k)
REPLIES = frozenset({"ready", "segment", "complete", "cancelled", "stopped", "error"})
SENTINEL = '{"type": "fuzz-sentinel"}'
# 1000 after stop/idle, 1001 shutdown, 1002 protocol error, 1003 unsupported data, 1007 bad UTF-8,
# 1008 policy (rate), 1009 too big, 1013 try again later.
CODED_CLOSES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1013})


@dataclass
class Answer:
    messages: list[dict] = field(default_factory=list)
    audio_bytes: int = 0
    close_code: int | None = None
    survived: bool = False  # the sentinel was answered: the session is still healthy

    @property
    def errors(self) -> list[str]:
        return [m["code"] for m in self.messages if m.get("type") == "error" and "fuzz-sentinel" not in m["message"]]


async def exchange(url: str, frames: list[str | bytes], start: dict | None = None, timeout: float = 15.0,
                   headers: dict | None = None) -> Answer:
    return await asyncio.wait_for(_exchange(url, frames, start, headers), timeout)


async def _exchange(url: str, frames: list[str | bytes], start: dict | None, headers: dict | None) -> Answer:
    answer = Answer()
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0, headers=headers) as ws:
        try:
            if start is not None:
                await ws.send_json(start)
                first = await ws.receive_json()
                assert first.get("type") == "ready", f"the valid start was answered {first}"
            for f in frames:
                await (ws.send_bytes(f) if isinstance(f, bytes) else ws.send_str(f))
            await ws.send_str(SENTINEL)
        except ConnectionError:  # the server closed on us (e.g. 1009): the close code tells why
            pass
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                answer.audio_bytes += len(msg.data)
                continue
            m = json.loads(msg.data)
            check_message(m)
            answer.messages.append(m)
            if m.get("type") == "error" and "fuzz-sentinel" in m["message"]:
                answer.survived = True
                break
        if not answer.survived:
            answer.close_code = ws.close_code
    return answer


def check_message(m: dict) -> None:
    assert isinstance(m, dict) and m.get("type") in REPLIES, f"unknown reply {m}"
    if m["type"] == "error":
        assert m.get("code") in CODES, f"error without a known code: {m}"
        assert isinstance(m.get("message"), str) and m["message"], m


def check_answer(a: Answer) -> None:
    """Survived, or closed with a protocol close code; never silent."""
    assert a.survived or a.close_code in CODED_CLOSES, f"no coded answer: close {a.close_code}, {a.messages}"
