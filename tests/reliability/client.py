"""A test client: one WebSocket session speaking a list of texts, with everything it saw recorded,
and the check that an utterance's audio is complete and correct."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np

UPSTREAM_HEADER = "X-Makima-Upstream"  # added by the test's nginx config: which replica answered


@dataclass
class Utterance:
    id: str
    text: str
    audio: bytearray = field(default_factory=bytearray)
    final: dict | None = None  # the complete or error message
    first_audio_at: float | None = None  # time.monotonic(), like Replica.sigterm_at
    final_at: float | None = None


@dataclass
class SessionResult:
    utterances: list[Utterance]
    upstream: str | None = None  # the replica nginx used (the last address tried)
    close_code: int | None = None
    failure: str | None = None  # what ended the session early, if anything


async def run_session(http: aiohttp.ClientSession, url: str, start: dict, texts: list[str], timeout: float = 60.0,
                      on_first_audio: Callable[[], None] | None = None, headers: dict | None = None,
                      queue_all: bool = False) -> SessionResult:
    """Open a session, speak ``texts`` one after another (or queue them all at once), close.
    Never raises for what the server does: the result says what happened."""
    result = SessionResult([Utterance(f"u{i}", t) for i, t in enumerate(texts)])
    try:
        await asyncio.wait_for(_session(http, url, start, result, on_first_audio, headers, queue_all), timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
        result.failure = f"{type(e).__name__}: {e}"
    return result


async def _session(http: aiohttp.ClientSession, url: str, start: dict, result: SessionResult,
                   on_first_audio: Callable[[], None] | None, headers: dict | None, queue_all: bool) -> None:
    utts = result.utterances
    async with http.ws_connect(url, headers=headers, max_msg_size=0) as ws:
        upstream = ws._response.headers.get(UPSTREAM_HEADER)
        result.upstream = upstream.split(",")[-1].strip() if upstream else None
        await ws.send_json(start)
        ready = await ws.receive_json()
        if ready.get("type") != "ready":
            result.failure = f"start answered {ready}"
            return
        if queue_all:
            for u in utts:
                await ws.send_json({"type": "speak", "id": u.id, "text": u.text})
        for u in utts:
            if not queue_all:
                await ws.send_json({"type": "speak", "id": u.id, "text": u.text})
            while u.final is None:
                msg = await ws.receive()
                if msg.type == aiohttp.WSMsgType.BINARY:
                    if u.first_audio_at is None:
                        u.first_audio_at = time.monotonic()
                        if on_first_audio is not None and u is utts[0]:
                            on_first_audio()
                    u.audio += msg.data
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    m = json.loads(msg.data)
                    if m.get("type") in ("complete", "error"):
                        u.final, u.final_at = m, time.monotonic()
                else:
                    result.close_code = ws.close_code
                    result.failure = f"socket ended during {u.id}: {msg.type.name} {msg.data!r}"
                    return
        await ws.close()
        result.close_code = ws.close_code


def problem(u: Utterance, reference: bytes | None, tolerance: int = 0) -> str | None:
    """Why this utterance is not complete and correct (pcm_s16le), or None. ``tolerance`` is in
    int16 steps: the real engine's batched float math may move a sample by one step."""
    if u.final is None:
        return "no final message"
    if u.final.get("type") != "complete":
        return f"ended with {u.final}"
    if u.final.get("id") != u.id:
        return f"complete names {u.final.get('id')!r}, not {u.id!r}"
    if len(u.audio) != u.final["frames"] * 1920 * 2:
        return f"{len(u.audio)} bytes for {u.final['frames']} frames"
    if reference is not None:
        if len(reference) != len(u.audio):
            return f"{len(u.audio)} bytes, reference has {len(reference)}"
        got, want = np.frombuffer(u.audio, "<i2").astype(np.int32), np.frombuffer(reference, "<i2").astype(np.int32)
        worst = int(np.abs(got - want).max()) if len(got) else 0
        if worst > tolerance:
            return f"audio differs from the reference by up to {worst} steps"
    return None


async def reference_audio(http: aiohttp.ClientSession, url: str, start: dict, texts: list[str]) -> dict[str, bytes]:
    """Each text spoken alone on an idle server: what every loaded run must reproduce."""
    result = await run_session(http, url, start, texts, timeout=120)
    assert result.failure is None, result.failure
    for u in result.utterances:
        assert problem(u, None) is None, problem(u, None)
    return {u.text: bytes(u.audio) for u in result.utterances}
