"""``WS /v1/audio/speech/ws``, subprotocol ``nari.speech.v1``: the live-text shape the public load
harness ``tts_bench`` (github.com/nari-labs/benchmarks) drives, as a thin adapter over one live
utterance (server/live.py) per connection.

    ← session.created {protocol, session_id, audio}
    → request.start {model, voice, language, response_format}   ← request.configured
    → input_text.append {sequence, text}                         ← input_text.ack {event, sequence}
    → input_text.end {sequence}                                  ← input_text.ack
    ← response.started {request_id, audio}, then binary PCM16 frames
    ← response.done {request_id, audio_chunks, stop_reason: "stop", makima_stop_reason}, close 1000

``stop_reason`` is always ``"stop"`` for an utterance that ended normally, as the harness requires
(also when our frame cap ended it: ``makima_stop_reason`` says ``eos`` or ``max_frames``). A voice
name the registry does not have falls back to the default voice, as the OpenAI route does for its
names (the harness sends its own model's speaker names). Errors are ``{"type": "error", "error":
{code, message}}`` with our codes, then close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

from aiohttp import WSCloseCode, WSMsgType, web

from engine.api import AudioChunk, Finished
from engine.voice import VoicePrompt
from server import protocol as P
from server.limits import request_key
from server.live import LiveUtterance
from server.pcm import encode_pcm
from server.speak import open_audio_socket
from server.state import AppState, get_state
from server.synth import Tracker, failed, stream_audio

log = logging.getLogger("makima.server.nari")
PROTOCOL = "nari.speech.v1"
START_FIELDS = {"type", "model", "voice", "language", "response_format", "sampling", "max_frames"}


class NariSession:
    def __init__(self, state: AppState, ws: web.WebSocketResponse) -> None:
        self.state, self.ws = state, ws
        self.id = uuid.uuid4().hex[:16]
        self.request_id = f"nari-{self.id}"
        self.live: LiveUtterance | None = None
        self.worker: asyncio.Task | None = None
        # The harness sends all its text and waits for every ack even when the audio ended first (the
        # model may stop before the text does): the socket closes only once the end is acknowledged.
        self.end_acked = False
        self.audio = {"encoding": "pcm_s16le", "sample_rate": state.require_engine().sample_rate, "channels": 1}

    async def send(self, msg: dict) -> None:
        await asyncio.wait_for(self.ws.send_json(msg), self.state.settings.write_timeout_s)

    async def send_error(self, e: P.ProtocolError) -> None:
        self.state.metrics.errors.labels(e.code).inc()
        with contextlib.suppress(Exception):
            await self.send({"type": "error", "error": {"code": e.code, "message": e.message}})

    async def run(self) -> None:
        await self.send({"type": "session.created", "protocol": PROTOCOL, "session_id": self.id, "audio": self.audio})
        s = self.state.settings
        loop = asyncio.get_running_loop()
        last_message = loop.time()
        while not self.ws.closed:
            # Only client events count as activity: aiohttp's receive(timeout=) restarts on every ping and
            # pong, and the heartbeat makes every compliant client pong (issue #13, as in server/speak.py).
            try:
                msg = await asyncio.wait_for(self.ws.receive(), max(0.0, last_message + s.idle_timeout_s - loop.time()))
            except asyncio.TimeoutError:
                if self.worker is not None and not self.worker.done():
                    last_message = loop.time()  # speaking is not idling: look again a whole timeout later
                    continue
                await self.send_error(P.ProtocolError(P.IDLE_TIMEOUT, f"no message for {s.idle_timeout_s:g} s"))
                return
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                last_message = loop.time()
            if msg.type != WSMsgType.TEXT:
                if msg.type == WSMsgType.BINARY:
                    await self.send_error(P.ProtocolError(P.UNSUPPORTED, "send JSON text frames"))
                    continue
                return  # closing, closed or failed: the finally of handle cancels the request
            try:
                if await self.on_message(msg.data):
                    return
            except P.ProtocolError as e:
                await self.send_error(e)

    async def on_message(self, raw: str) -> bool:
        """Handle one client event; True when the session is over."""
        try:
            msg = P.loads(raw)
        except (ValueError, RecursionError) as e:
            raise P.ProtocolError(P.INVALID_MESSAGE, f"not valid JSON: {e}") from e
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "request.start":
            await self.on_start(msg)
        elif kind in ("input_text.append", "input_text.end"):
            if self.live is None:
                raise P.ProtocolError(P.INVALID_MESSAGE, f"send request.start before {kind}")
            sequence = msg.get("sequence")
            if isinstance(sequence, bool) or not isinstance(sequence, int):
                raise P.ProtocolError(P.INVALID_MESSAGE, f"{kind}.sequence must be an integer")
            if kind == "input_text.append":
                text = msg.get("text")
                if not isinstance(text, str):
                    raise P.ProtocolError(P.INVALID_MESSAGE, "input_text.append.text must be a string")
                self.live.append(P.check_unicode(text, "text"), None)
                self.state.metrics.input_chars.inc(len(text))
            elif not self.live.ended:
                self.live.end()
            await self.send({"type": "input_text.ack", "event": kind, "sequence": sequence})
            if kind == "input_text.end":
                self.end_acked = True
                return self.worker.done()  # done before the text was: the session ends with this ack
        elif kind == "response.cancel":
            return True  # handle's finally cancels the request and closes 1000
        else:
            raise P.ProtocolError(P.UNSUPPORTED, f"unknown event type {str(kind)[:32]!r}")
        return False

    async def on_start(self, msg: dict) -> None:
        if self.live is not None:
            raise P.ProtocolError(P.INVALID_MESSAGE, "one request per connection: request.start came twice")
        unknown = sorted(set(msg) - START_FIELDS)
        if unknown:
            raise P.ProtocolError(P.INVALID_MESSAGE, f"request.start: unknown field(s) {', '.join(unknown)}")
        fmt = msg.get("response_format", "pcm")
        if fmt != "pcm":
            raise P.ProtocolError(P.UNSUPPORTED, "response_format must be pcm (16-bit little-endian)")
        voice = msg.get("voice")
        if voice is not None and not isinstance(voice, str):
            raise P.ProtocolError(P.INVALID_MESSAGE, "voice must be a voice name")
        language = msg.get("language") or "auto"
        if not isinstance(language, str):
            raise P.ProtocolError(P.INVALID_MESSAGE, "language must be a string")
        max_frames = msg.get("max_frames")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise P.ProtocolError(P.INVALID_MESSAGE, "max_frames must be an integer >= 1")
        start = P.Start(language=language.strip().lower() or "auto", sampling=P.parse_sampling(msg.get("sampling")),
                        max_frames=max_frames)
        self.state.check_language(start.language)
        name = voice.strip().lower() if voice else None
        if name is not None and self.state.voices.info(name) is None and self.state.settings.default_voice:
            name = None  # the harness's speaker names are another model's: speak with the default voice
        prompt, voice_name = await self.state.voice_prompt(None if name is None else P.parse_voice(name, 0))
        self.live = LiveUtterance("", self.state.settings.max_text_chars)
        self.worker = asyncio.create_task(self.speak(prompt, start))
        await self.send({"type": "request.configured", "request_id": self.request_id, "voice": voice_name,
                         "language": start.language, "audio": self.audio})

    async def speak(self, prompt: VoicePrompt, start: P.Start) -> None:
        ok = False
        try:
            ok = await self._speak(prompt, start)
        except (ConnectionError, RuntimeError, asyncio.TimeoutError):
            log.info("nari session %s: the client stopped reading", self.id)
        except Exception as e:  # an engine that raises instead of reporting: fail this request only
            log.exception("nari session %s: engine raised", self.id)
            await self.send_error(P.ProtocolError(P.SYNTHESIS_ERROR, f"{type(e).__name__}: {e}"))
        if self.end_acked or not ok:  # otherwise the reader closes once it has acknowledged the end
            with contextlib.suppress(Exception):
                await self.ws.close(code=WSCloseCode.OK, message=b"done")  # also ends the reader's receive

    async def _speak(self, prompt: VoicePrompt, start: P.Start) -> bool:
        """Stream the utterance; True when it ended normally (response.done sent)."""
        engine, state = self.state.require_engine(), self.state
        track = Tracker(state.metrics, engine.sample_rate)
        request = state.request("", prompt, start, self.request_id)
        self.live.bind(engine, request)  # no await before the stream's first step (server/live.py)
        chunks, finished = 0, None
        async with contextlib.aclosing(stream_audio(engine, request, state.watch)) as stream:
            async for item in stream:
                if isinstance(item, AudioChunk):
                    if chunks == 0:
                        await self.send({"type": "response.started", "request_id": self.request_id,
                                         "audio": self.audio})
                    await asyncio.wait_for(self.ws.send_bytes(encode_pcm(item.samples, "pcm_s16le")),
                                           state.settings.write_timeout_s)
                    chunks += 1
                    track.sent(item)
                else:
                    finished = item
        assert isinstance(finished, Finished)
        if failed(finished):
            await self.send_error(track.error(finished))
            return False
        if chunks == 0:  # an utterance with no audio still starts before it is done
            await self.send({"type": "response.started", "request_id": self.request_id, "audio": self.audio})
        done = track.done(finished)
        await self.send({"type": "response.done", "request_id": self.request_id, "audio_chunks": chunks,
                         "stop_reason": "stop", "makima_stop_reason": finished.stop_reason.value,
                         "frames": finished.frames, "audio_ms": done["audio_ms"], "ttfa_ms": done["ttfa_ms"]})
        return True


async def handle(request: web.Request) -> web.StreamResponse:
    ws = await open_audio_socket(request, PROTOCOL)
    if not isinstance(ws, web.WebSocketResponse):
        return ws  # draining: refused before the upgrade
    state = get_state(request)
    key = request_key(request)
    try:
        if ws.ws_protocol != PROTOCOL:
            raise P.ProtocolError(P.UNSUPPORTED, f"this route speaks the {PROTOCOL} subprotocol only")
        state.require_engine()
        state.acquire_slot(key)
    except P.ProtocolError as e:
        await ws.send_json({"type": "error", "error": {"code": e.code, "message": e.message}})
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER if e.code in (P.OVERLOADED, P.RATE_LIMITED, P.TTS_UNAVAILABLE)
                       else WSCloseCode.PROTOCOL_ERROR, message=e.code.lower().encode())
        return ws
    session = NariSession(state, ws)
    try:
        await session.run()  # returns once the worker has closed, or the client cancelled or left
    except (ConnectionError, RuntimeError, asyncio.TimeoutError):
        log.info("nari session %s: client gone", session.id)
    finally:
        if session.worker is not None and not session.worker.done():
            session.worker.cancel()  # leaving the engine stream early cancels the request
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.worker
        state.release_slot(key)
        if not ws.closed:
            await ws.close(code=WSCloseCode.OK)
    return ws
