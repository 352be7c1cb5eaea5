"""``/api/v1/speak``: one WebSocket session = a voice, settings and a queue of utterances.

The handler task is the only reader (aiohttp's rule) and reacts at once to cancel, stop and a
vanished client; one worker task per session takes utterances in order, submits each to the
engine and sends its audio. Cancelling the worker leaves the engine's stream early, which
cancels the request and frees its KV blocks within one step. Every send has a timeout, so a
client that stops reading loses its session instead of holding an engine slot forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import deque
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web

from engine.api import AudioChunk, Finished
from engine.voice import VoicePrompt
from server import protocol as P
from server.limits import TokenBucket, limit_send_buffer, request_key
from server.live import LiveUtterance
from server.pcm import encode_pcm
from server.sentences import SentenceBuffer
from server.state import AppState, get_state
from server.synth import Tracker, failed, stream_audio

log = logging.getLogger("makima.server.speak")
SUBPROTOCOL = "makima-tts.v1"


@dataclass
class Utterance:
    id: str | int
    text: str
    live: LiveUtterance | None = None  # a live utterance: its text arrives with append until end


class ClientGone(Exception):
    """The client closed, vanished or stopped reading; nothing more can be sent."""


class Session:
    def __init__(self, state: AppState, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None,
                 bucket: TokenBucket | None = None, key: str | None = None) -> None:
        self.state, self.ws, self.settings = state, ws, state.settings
        self.transport = transport
        self.key = key  # the client's token: its session slots are counted against it
        self.holds_slot = False  # a session slot is taken at start, not at the handshake
        self.bucket = bucket or state.limits.new_bucket()  # message rate: the token's, or this socket's
        self.refused = 0  # messages refused in a row for rate
        self.id = uuid.uuid4().hex[:16]
        self.start: P.Start | None = None
        self.voice: VoicePrompt | None = None
        self.voice_name: str | None = None  # None: an inline voice
        self.queue: deque[Utterance] = deque()
        self.current: Utterance | None = None
        self.wakeup = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.text = SentenceBuffer()
        self.live: Utterance | None = None  # the open live utterance (queued or speaking, not ended)
        self._ids = itertools.count(1)  # names for utterances the client did not name
        self._rids = itertools.count(1)  # engine request ids, unique per session
        self.closing = False

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.queue)

    # ---- sending ------------------------------------------------------------------------------
    async def send_json(self, msg: dict) -> None:
        if msg.get("type") == "error":
            self.state.metrics.errors.labels(msg["code"]).inc()
        await self._send(self.ws.send_json(msg))

    async def send_error(self, e: P.ProtocolError) -> None:
        await self.send_json(P.error(e.code, e.message, e.id))

    async def _send(self, coro) -> None:
        if self.ws.closed:
            coro.close()
            raise ClientGone()
        try:
            await asyncio.wait_for(coro, self.settings.write_timeout_s)
        except asyncio.TimeoutError as e:
            log.info("session %s: client stopped reading for %g s; closing", self.id, self.settings.write_timeout_s)
            self.closing = True
            # A polite close would queue behind the unread audio; drop the connection instead, which
            # also wakes the reader.
            if self.transport is not None:
                self.transport.abort()
            raise ClientGone() from e
        except (ConnectionError, RuntimeError) as e:  # ConnectionError covers a send blocked in drain
            raise ClientGone() from e

    # ---- client messages ----------------------------------------------------------------------
    async def on_text(self, raw: str) -> None:
        try:
            msg = P.parse_message(raw, self.settings.max_text_chars, self.settings.max_upload_bytes)
            if isinstance(msg, P.Start):
                await self.on_start(msg)
            elif self.start is None:
                raise P.ProtocolError(P.INVALID_MESSAGE, f"send a start message before {type(msg).__name__.lower()}",
                                      getattr(msg, "id", None))
            elif isinstance(msg, P.Speak):
                self.on_speak(msg)
            elif isinstance(msg, P.Append) and self.live is not None:
                await self.on_live_append(msg)
            elif isinstance(msg, P.Append):
                await self.on_append(msg.text)
            elif isinstance(msg, P.End):
                await self.on_end(msg)
            elif isinstance(msg, P.Flush):
                rest = self.text.flush()
                if rest:
                    await self.enqueue_segment(rest)
            elif isinstance(msg, P.Cancel):
                await self.on_cancel()
            elif isinstance(msg, P.Stop):
                self.closing = True  # first, so cancel_all does not start a new worker
                await self.cancel_all()
                await self.send_json({"type": "stopped"})
                await self.ws.close(code=WSCloseCode.OK, message=b"stopped")
        except P.ProtocolError as e:
            await self.send_error(e)

    async def on_start(self, msg: P.Start) -> None:
        if self.start is not None:
            raise P.ProtocolError(P.INVALID_MESSAGE, "this session has already started; open a new one to change "
                                                     "its voice or settings")
        if self.state.draining:  # opened just before the drain began: send the client elsewhere
            self.closing = True
            await self.send_error(P.ProtocolError(P.TTS_UNAVAILABLE, "the server is shutting down; reconnect "
                                                                     "(another replica will answer)"))
            await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"draining")
            return
        engine = self.state.require_engine()
        self.state.check_language(msg.language)
        try:
            self.state.acquire_slot(self.key)
        except P.ProtocolError as e:  # full: say why, then close 1013 as a refused handshake did before
            self.closing = True
            await self.send_error(e)
            await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=e.code.lower().encode())
            return
        self.holds_slot = True
        try:
            self.voice, self.voice_name = await self.state.voice_prompt(msg.voice)
        except BaseException:  # no start, no slot: the client may send start again on this socket
            self.release_slot()
            raise
        self.start = msg
        self.worker = asyncio.create_task(self.run())
        await self.send_json(P.ready(self.id, engine.sample_rate, msg.encoding, self.voice_name, msg.language))

    def on_speak(self, msg: P.Speak) -> None:
        id = msg.id if msg.id is not None else f"utt-{next(self._ids)}"
        if not msg.live:
            self.enqueue(id, msg.text)
            return
        if self.live is not None:
            raise P.ProtocolError(P.INVALID_MESSAGE, f"live utterance {self.live.id!r} is still open; send end first",
                                  id)
        if self.start.non_streaming_text:
            raise P.ProtocolError(P.INVALID_MESSAGE, "this session has non_streaming_text, which needs the whole "
                                                     "text first; live utterances need streaming text", id)
        self.live = self.enqueue(id, msg.text, LiveUtterance(msg.text, self.settings.max_text_chars))

    async def on_live_append(self, msg: P.Append) -> None:
        u = self.live
        u.live.append(msg.text, u.id)
        self.state.metrics.input_chars.inc(len(msg.text))
        if msg.seq is not None:
            await self.send_json(P.ack("append", msg.seq, u.id))

    async def on_end(self, msg: P.End) -> None:
        u, self.live = self.live, None
        if u is None:
            raise P.ProtocolError(P.INVALID_MESSAGE, "no live utterance is open (speak with \"live\": true opens one)")
        u.live.end()
        if msg.seq is not None:
            await self.send_json(P.ack("end", msg.seq, u.id))

    def enqueue(self, id: str | int, text: str, live: LiveUtterance | None = None) -> Utterance:
        if len(self.queue) >= self.settings.max_queued_utterances:
            raise P.ProtocolError(P.OVERLOADED, f"{len(self.queue)} utterances are already queued in this session", id)
        self.queue.append(Utterance(id, text, live))
        self.state.metrics.input_chars.inc(len(text))
        self.wakeup.set()
        return self.queue[-1]

    async def enqueue_segment(self, text: str) -> None:
        id = f"seg-{next(self._ids)}"
        self.enqueue(id, text)
        # Tell the client which text this id speaks: it may show captions or track what is pending.
        await self.send_json({"type": "segment", "id": id, "text": text})

    async def on_append(self, text: str) -> None:
        if len(self.text) + len(text) > self.settings.max_append_chars:
            raise P.ProtocolError(P.TEXT_TOO_LONG, f"more than {self.settings.max_append_chars} characters appended "
                                                   "without a sentence end; send flush")
        for sentence in self.text.push(text):
            await self.enqueue_segment(sentence)

    async def on_cancel(self) -> None:
        current = self.current.id if self.current else None
        dropped = await self.cancel_all()
        await self.send_json({"type": "cancelled", "id": current, "dropped": dropped})

    async def cancel_all(self) -> list:
        """Stop the utterance being spoken, drop the queue and unflushed text; restart the worker."""
        dropped = [u.id for u in self.queue]
        self.queue.clear()
        self.text.clear()
        self.live = None
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.worker
            if self.current is not None:
                self.state.metrics.requests.labels("cancelled").inc()
            self.current = None
            self.worker = asyncio.create_task(self.run()) if not self.closing else None
        return dropped

    # ---- synthesis ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                while not self.queue:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                self.current = self.queue.popleft()
                try:
                    await self.speak(self.current)
                except (ClientGone, asyncio.CancelledError):
                    raise
                except Exception as e:  # an engine that raises instead of reporting: fail this utterance only
                    log.exception("session %s utterance %r: engine raised", self.id, self.current.id)
                    self.state.metrics.requests.labels("error").inc()
                    await self.send_error(P.ProtocolError(P.SYNTHESIS_ERROR, f"{type(e).__name__}: {e}",
                                                          self.current.id))
                self.current = None
        except ClientGone:
            self.closing = True
            if self.current is not None:
                self.state.metrics.requests.labels("client_gone").inc()
                self.current = None  # counted once: close() must not count it again

    async def speak(self, u: Utterance) -> None:
        state, start, voice = self.state, self.start, self.voice
        engine = state.engine
        assert start is not None and engine is not None  # start checked both
        # A CustomVoice speaker has no voice prompt: its name is the request's speaker.
        request = state.request(u.text, voice, start, f"{self.id}-{next(self._rids)}",
                                self.voice_name if voice is None else None)
        track = Tracker(state.metrics, engine.sample_rate, request.request_id, self.voice_name)
        if u.live is not None:
            u.live.bind(engine, request)  # no await from here to the stream's first step (server/live.py)
        finished: Finished | None = None
        async with contextlib.aclosing(stream_audio(engine, request, state.watch)) as stream:
            async for item in stream:
                if isinstance(item, AudioChunk):
                    # Stamped as it is handed to the socket: how long the send then waits on the client
                    # reading is the client's time, which its own figure counts (it ends when it hears it).
                    track.sent(item)
                    await self._send(self.ws.send_bytes(encode_pcm(item.samples, start.encoding)))
                else:
                    finished = item
        assert finished is not None
        if failed(finished):
            log.warning("session %s utterance %r failed: %s %s", self.id, u.id, finished.error_code, finished.error)
            e = track.error(finished)
            e.id = u.id
            await self.send_error(e)
        else:
            await self.send_json(track.done(finished, u.id))

    async def refuse(self) -> bool:
        """A message over the rate limit: refuse it with RATE_LIMITED and say whether the session goes
        on. A client that keeps sending after ``message_burst`` refusals in a row is closed (1008)."""
        self.refused += 1
        if self.refused > self.settings.message_burst:
            log.info("session %s: %d messages refused in a row for rate; closing", self.id, self.refused)
            self.closing = True
            await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"message rate")
            return False
        with contextlib.suppress(ClientGone):
            await self.send_error(P.ProtocolError(P.RATE_LIMITED, f"over {self.settings.max_messages_per_s:g} "
                                                                  "messages a second; this one was dropped"))
        return True

    def release_slot(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.state.release_slot(self.key)

    async def close(self) -> None:
        self.closing = True
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.worker
            if self.current is not None:
                self.state.metrics.requests.labels("client_gone").inc()


async def open_audio_socket(request: web.Request, protocol: str) -> web.StreamResponse:
    """The upgrade every audio WebSocket route shares: refused with 503 while draining (before the
    upgrade, so a proxy can retry another replica), our heartbeat and message limit, and the small send
    buffer that makes the write deadline measure the client's reading. A ``WebSocketResponse`` when open."""
    state = get_state(request)
    if state.draining:
        return error_response(P.ProtocolError(P.TTS_UNAVAILABLE, "the server is shutting down"), state,
                              headers={"Retry-After": "1"})
    s = state.settings
    ws = web.WebSocketResponse(heartbeat=s.heartbeat_s, compress=False, max_msg_size=s.ws_max_message_bytes,
                               protocols=(protocol,))
    await ws.prepare(request)
    limit_send_buffer(request.transport, s.send_buffer_bytes)
    return ws


async def handle(request: web.Request) -> web.StreamResponse:
    ws = await open_audio_socket(request, SUBPROTOCOL)
    if not isinstance(ws, web.WebSocketResponse):
        return ws  # draining: refused before the upgrade
    state = get_state(request)
    s = state.settings
    key = request_key(request)
    session = Session(state, ws, request.transport, state.limits.bucket(key), key)
    if len(state.sessions) >= s.max_connections:
        # After the upgrade, so browsers (which cannot read a refused handshake) see the reason.
        with contextlib.suppress(ClientGone):
            await session.send_error(P.ProtocolError(P.OVERLOADED, f"the server holds its limit of "
                                                                   f"{s.max_connections} connections; retry shortly"))
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"overloaded")
        return ws
    state.sessions.add(session)
    try:
        await read_loop(session)
    finally:
        state.sessions.discard(session)
        await session.close()
        session.release_slot()
        if not ws.closed:
            await ws.close()
    return ws


def _deadline(session: Session, last_message: float, opened: float) -> tuple[float, str]:
    """When the socket is closed for silence, and why. Only application messages count: aiohttp's
    receive() timeout restarts on every ping and pong, and our own heartbeat makes every compliant
    client pong, so that timeout never fired. A socket that never starts holds no session slot, but it
    holds one of max_connections: it gets start_timeout_s to start."""
    s = session.settings
    deadline, why = last_message + s.idle_timeout_s, f"no message for {s.idle_timeout_s:g} s"
    if session.start is None and opened + s.start_timeout_s < deadline:
        deadline, why = opened + s.start_timeout_s, f"no start within {s.start_timeout_s:g} s"
    return deadline, why


async def read_loop(session: Session) -> None:
    ws = session.ws
    loop = asyncio.get_running_loop()
    opened = last_message = loop.time()
    while not session.closing:
        deadline, why = _deadline(session, last_message, opened)
        try:
            msg = await asyncio.wait_for(ws.receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            if session.busy:  # speaking is not idling: look again a whole timeout later
                last_message = loop.time()
                continue
            with contextlib.suppress(ClientGone):
                await session.send_error(P.ProtocolError(P.IDLE_TIMEOUT, why))
            await ws.close(code=WSCloseCode.OK, message=b"idle timeout")
            return
        if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
            last_message = loop.time()
            if not session.bucket.take():
                if await session.refuse():
                    continue
                return
            session.refused = 0
        if msg.type == WSMsgType.TEXT:
            try:
                await session.on_text(msg.data)
            except ClientGone:
                return
        elif msg.type == WSMsgType.BINARY:
            with contextlib.suppress(ClientGone):
                await session.send_error(P.ProtocolError(P.UNSUPPORTED, "binary frames from the client are not "
                                                                        "accepted; send JSON text frames"))
        else:  # CLOSE, CLOSING, CLOSED, ERROR: the client is gone or going
            return


RETRY_LATER = frozenset({P.OVERLOADED, P.TTS_UNAVAILABLE, P.RATE_LIMITED})  # worth retrying in a moment


def error_response(e: P.ProtocolError, state: AppState, headers: dict | None = None) -> web.Response:
    state.metrics.errors.labels(e.code).inc()
    if e.code in RETRY_LATER:
        headers = {"Retry-After": "1", **(headers or {})}
    return web.json_response(P.error(e.code, e.message, e.id), status=P.HTTP_STATUS.get(e.code, 400), headers=headers)
