"""The client side of ``/api/v1/speak`` for the load generator: sessions that open, speak and record when
every audio chunk arrived, and the listener's playback clock that turns arrivals into underruns and
stall time (docs/protocol.md). ``bench/serve_load.py`` drives many of these at a given load.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
import wave
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np

from bench.texts import Text

SAMPLE_RATE = 24000
BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4}
SPEAK_PATH = "/api/v1/speak"


# ---- the listener's clock ---------------------------------------------------------------------
@dataclass
class Playback:
    underruns: int
    stall_s: float
    late_chunks: list[int]  # indices of the chunks that arrived after the audio before them ran out


def playback(chunks: list[tuple[float, float]], preroll_s: float = 0.0) -> Playback:
    """Play ``chunks`` ((arrival s, audio s), in order) on a real-time clock that starts ``preroll_s``
    after the first arrives. A chunk that arrives after the audio before it has finished playing is an
    underrun: the listener hears silence until it arrives (its stall), then playback resumes."""
    late: list[int] = []
    stall = 0.0
    play_end: float | None = None
    for i, (arrival, seconds) in enumerate(chunks):
        if play_end is None:
            play_end = arrival + preroll_s + seconds
            continue
        if arrival > play_end:
            late.append(i)
            stall += arrival - play_end
            play_end = arrival
        play_end += seconds
    return Playback(len(late), stall, late)


@dataclass
class Utterance:
    text_id: str
    chars: int
    session: int  # which session spoke it (-1: none could be opened)
    start_s: float  # when ``speak`` was sent, seconds since the level started
    chunks: list[tuple[float, float]] = field(default_factory=list)  # (arrival s after speak, audio s)
    end_s: float | None = None  # ``complete`` received, seconds after speak
    error: str | None = None  # the server's error code, or TIMEOUT / CLOSED / CONNECT_FAILED / HTTP_nnn
    server_ttfa_ms: float | None = None
    stop_reason: str | None = None
    last_text_s: float | None = None  # word by word: the last piece (end or flush) sent, seconds after the first

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None

    @property
    def audio_s(self) -> float:
        return sum(seconds for _, seconds in self.chunks)

    def record(self, preroll_s: float) -> dict:
        """The utterance with its derived numbers, for the JSON report and the aggregates."""
        p = playback(self.chunks, preroll_s)
        audio = self.audio_s
        last = self.last_text_s
        after = [a for a, _ in self.chunks if last is not None and a >= last]
        return {
            # Word by word, what a voice agent waits for once its LLM is done: the first audio that
            # arrives after the last text was sent, and the end of the utterance, both from that send.
            "last_text_s": last, "final_text_ttfa_s": after[0] - last if after else None,
            "final_text_e2e_s": self.end_s - last if last is not None and self.end_s is not None else None,
            "text_id": self.text_id, "chars": self.chars, "session": self.session, "start_s": self.start_s,
            "ok": self.ok, "error": self.error, "ttfa_s": self.chunks[0][0] if self.chunks else None,
            "e2e_s": self.end_s, "audio_s": audio, "rtf": self.end_s / audio if self.end_s and audio else None,
            "underruns": p.underruns, "stall_s": p.stall_s, "late_chunks": p.late_chunks,
            "server_ttfa_ms": self.server_ttfa_ms, "stop_reason": self.stop_reason,
            "chunks": [[round(a, 6), round(s, 6)] for a, s in self.chunks],
        }


# ---- a voice for servers that have none ---------------------------------------------------------
def synthetic_voice_wav(seconds: float = 3.0) -> bytes:
    """A speech-shaped clip (a gliding ~120 Hz buzz through three vowel-like formants, syllables at
    4 Hz) as 16-bit WAV: enough for an x-vector voice, with no recording to ship or license."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 120.0 + 15.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    k = np.arange(1, 31)[None, :]
    freqs = k * f0[:, None]
    gain = 0.05 + sum(np.exp(-0.5 * ((freqs - fc) / bw) ** 2) for fc, bw in ((700, 130), (1200, 150), (2600, 250)))
    buzz = (gain / k * np.sin(k * phase[:, None])).sum(axis=1)
    x = buzz * (0.5 - 0.5 * np.cos(2 * np.pi * 4.0 * t)) ** 0.5
    pcm = (0.3 * 32767 * x / np.abs(x).max()).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


# ---- the server ---------------------------------------------------------------------------------
def speak_url(url: str) -> str:
    """``ws://host:port`` → ``ws://host:port/api/v1/speak``; a URL with a path is kept as given."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"--url {url}: expected ws://HOST:PORT or wss://HOST:PORT")
    return urlunsplit(parts._replace(path=parts.path if parts.path not in ("", "/") else SPEAK_PATH))


def http_url(ws_url: str, path: str) -> str:
    parts = urlsplit(ws_url)
    return urlunsplit(parts._replace(scheme="https" if parts.scheme == "wss" else "http", path=path, query=""))


async def server_info(ws_url: str, headers: dict[str, str], ready_timeout_s: float) -> dict:
    """Wait for /ready (``serve`` loads its model in the background), then return /api/v1/info."""
    deadline = time.monotonic() + ready_timeout_s
    reason = "no answer"
    async with aiohttp.ClientSession(headers=headers) as http:
        while True:
            try:
                async with http.get(http_url(ws_url, "/ready")) as r:
                    if r.status == 200:
                        break
                    reason = (await r.json(content_type=None)).get("reason", f"HTTP {r.status}")
            except (aiohttp.ClientError, json.JSONDecodeError) as e:
                reason = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise RuntimeError(f"{http_url(ws_url, '/ready')} not ready after {ready_timeout_s:g} s: {reason}")
            await asyncio.sleep(0.5)
        async with http.get(http_url(ws_url, "/api/v1/info")) as r:
            return await r.json()


@dataclass
class Target:
    url: str  # the /api/v1/speak WebSocket
    start: dict  # the start message every session sends
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0  # per utterance, and for connect + ready
    # How text is sent: "speak" (whole), "live" (one live utterance fed word by word) or "sentences"
    # (words by append, the server speaking each sentence as it completes, flush at the end).
    text_input: str = "speak"
    word_interval_s: float = 0.05  # between words, when fed word by word (an LLM's token rate)


def word_pieces(text: str) -> list[str]:
    """Each word with the whitespace before the next one, as an LLM streams it (and tts_bench splits)."""
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    bounds = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if a < b]


class SessionError(Exception):
    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class Session:
    """One open /api/v1/speak socket after ``ready``; speaks one utterance at a time."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, number: int, encoding: str) -> None:
        self.ws, self.number, self.broken = ws, number, False
        self.bytes_per_second = BYTES_PER_SAMPLE[encoding] * SAMPLE_RATE
        self.said = 0

    async def _feed(self, text: str, live: bool, interval_s: float, sent: float, u: Utterance) -> None:
        """Send ``text`` word by word on a fixed schedule from ``sent``; record when the last went."""
        if live:
            await self.ws.send_json({"type": "speak", "id": self.said, "live": True})
        for i, piece in enumerate(word_pieces(text)):
            await asyncio.sleep(max(0.0, sent + i * interval_s - time.perf_counter()))
            await self.ws.send_json({"type": "append", "text": piece})
        await self.ws.send_json({"type": "end"} if live else {"type": "flush"})
        u.last_text_s = time.perf_counter() - sent

    async def speak(self, text: Text, clock0: float, timeout_s: float, text_input: str = "speak",
                    word_interval_s: float = 0.05) -> Utterance:
        """One utterance; sent word by word (``live`` or ``sentences``), times count from the first word.
        In sentence mode the server speaks several utterances (one per sentence): their audio is this one's."""
        self.said += 1
        u = Utterance(text.id, len(text.text), self.number, 0.0)
        sent = time.perf_counter()
        u.start_s = sent - clock0
        deadline = sent + timeout_s
        feeder = None
        segments: list[str] = []  # sentence mode: the sentences the server queued
        completes = 0
        try:
            if text_input == "speak":
                await self.ws.send_json({"type": "speak", "id": self.said, "text": text.text})
            else:
                feeder = asyncio.ensure_future(self._feed(text.text, text_input == "live", word_interval_s, sent, u))
            while True:
                msg = await self.ws.receive(timeout=max(deadline - time.perf_counter(), 0.001))
                now = time.perf_counter() - sent  # first thing after the frame arrives: it is the arrival time
                if msg.type == aiohttp.WSMsgType.BINARY:
                    u.chunks.append((now, len(msg.data) / self.bytes_per_second))
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    self.broken, u.error = True, "CLOSED"
                    return u
                m = json.loads(msg.data)
                if m.get("type") == "segment":
                    segments.append(m.get("text", ""))
                elif m.get("type") == "complete":
                    completes += 1
                    if u.server_ttfa_ms is None:
                        u.server_ttfa_ms = m.get("ttfa_ms")
                    u.end_s, u.stop_reason = now, m.get("stop_reason")
                    spoken = " ".join(segments).split() == text.text.split() if text_input == "sentences" else True
                    if text_input != "sentences" or (feeder.done() and spoken and completes == len(segments)):
                        return u
                if m.get("type") == "error":
                    u.error, u.end_s = m.get("code", "ERROR"), now
                    return u
        except asyncio.TimeoutError:
            self.broken, u.error = True, "TIMEOUT"  # the socket may still carry its audio: never reuse it
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            self.broken, u.error = True, "CLOSED"
        except ValueError:  # a text frame that is not JSON: count it, do not let it end the run
            self.broken, u.error = True, "BAD_MESSAGE"
        finally:
            if feeder is not None and not feeder.done():
                self.broken = True  # text still going out for an utterance that has ended: never reuse it
                feeder.cancel()
        return u


class SessionPool:
    """Idle sessions for reuse; a new one is opened when none is idle. Broken ones are dropped."""

    def __init__(self, http: aiohttp.ClientSession, target: Target) -> None:
        self.http, self.target = http, target
        self.idle: list[Session] = []
        self.open: list[Session] = []
        self.setup_s: list[float] = []  # connect → ready, per session

    async def _connect(self) -> Session:
        t0 = time.perf_counter()
        try:
            ws = await self.http.ws_connect(self.target.url, headers=self.target.headers, autoping=True)
        except aiohttp.WSServerHandshakeError as e:
            raise SessionError(f"HTTP_{e.status}", e.message) from e
        except (aiohttp.ClientError, OSError) as e:
            raise SessionError("CONNECT_FAILED", str(e)) from e
        try:
            await ws.send_json(self.target.start)
            msg = await ws.receive(timeout=self.target.timeout_s)
            m = json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else {}
        except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            await ws.close()
            raise SessionError("CONNECT_FAILED", f"no ready: {type(e).__name__}") from e
        if m.get("type") != "ready":
            await ws.close()
            raise SessionError(m.get("code", "CLOSED"), m.get("message", f"{msg.type.name} instead of ready"))
        self.setup_s.append(time.perf_counter() - t0)
        session = Session(ws, len(self.open), m.get("encoding", "pcm_s16le"))
        self.open.append(session)
        return session

    async def preopen(self, n: int) -> None:
        """Open ``n`` sessions before the clock starts, so session setup does not land in the run."""
        sessions = await asyncio.gather(*(self._connect() for _ in range(n)), return_exceptions=True)
        self.idle += [s for s in sessions if isinstance(s, Session)]

    async def acquire(self) -> Session:
        return self.idle.pop() if self.idle else await self._connect()

    def release(self, session: Session) -> None:
        if not session.broken:
            self.idle.append(session)
        else:
            asyncio.ensure_future(session.ws.close())

    async def close(self) -> None:
        await asyncio.gather(*(s.ws.close() for s in self.open if not s.ws.closed), return_exceptions=True)
