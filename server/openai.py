"""``POST /v1/audio/speech``, shaped like OpenAI's so existing clients (OpenWebUI, SillyTavern, the
openai SDK) work unchanged, plus the voice-cloning extensions Qwen3-TTS servers share.

``pcm`` streams the body as it is generated; ``wav``, ``flac``, ``mp3`` and ``opus`` are whole files
sent when done, so a ``wav`` header carries its true sizes. The extension ``"stream"`` picks the other
way for ``pcm`` and ``wav`` (a streamed ``wav`` header cannot know its sizes). ``stream_format: "sse"``
sends base64 PCM in ``speech.audio.delta`` events and ends with ``speech.audio.done``. Unknown fields are ignored,
as OpenAI-compatible clients often send their own extras.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import uuid

import numpy as np
from aiohttp import web

from engine.api import AudioChunk, Finished
from server import protocol as P
from server.bodies import json_body
from server.limits import limit_send_buffer, request_key
from server.pcm import FILE_FORMATS, encode_file, encode_pcm, wav_header
from server.speak import error_response
from server.state import AppState, get_state
from server.synth import Tracker, failed, stream_audio

log = logging.getLogger("makima.server.openai")
FORMATS = ("pcm", "wav", *FILE_FORMATS)
STREAMABLE = ("pcm", "wav")


def _field(body: dict, key: str, kinds: type | tuple[type, ...], default: object = None) -> object:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        raise P.ProtocolError(P.INVALID_MESSAGE, f"{key} has the wrong type")
    return value


def parse(body: object, state: AppState) -> tuple[P.Start, str, str, str, bool]:
    """The JSON body → (session-like start, text, response_format, stream_format, streamed)."""
    s = state.settings
    if not isinstance(body, dict):
        raise P.ProtocolError(P.INVALID_MESSAGE, "the body must be a JSON object")
    text = _field(body, "input", str)
    if text is None:
        raise P.ProtocolError(P.INVALID_MESSAGE, "input (the text to speak) is required")
    P.check_text(text, s.max_text_chars)
    fmt = _field(body, "response_format", str, "mp3")
    if fmt not in FORMATS:
        raise P.ProtocolError(P.UNSUPPORTED, f"response_format {fmt[:16]!r} is not offered; use one of "
                                             f"{', '.join(FORMATS)}")
    stream_format = _field(body, "stream_format", str, "audio")
    if stream_format not in ("audio", "sse"):
        raise P.ProtocolError(P.UNSUPPORTED, "stream_format must be audio or sse")
    if stream_format == "sse" and fmt != "pcm":
        raise P.ProtocolError(P.UNSUPPORTED, "stream_format sse sends pcm; set response_format to pcm")
    # Only raw pcm streams by default: a whole wav is what a reader that trusts the header (Python's
    # wave, many players) needs, and a client that wants its first audio early says "stream": true.
    streamed = _field(body, "stream", bool, fmt == "pcm" or stream_format == "sse")
    if streamed and fmt not in STREAMABLE:
        raise P.ProtocolError(P.UNSUPPORTED, f"stream is offered for {' and '.join(STREAMABLE)}; {fmt} is a whole file")
    if not streamed and stream_format == "sse":
        raise P.ProtocolError(P.UNSUPPORTED, "stream_format sse streams; leave stream out or set it true")
    speed = _field(body, "speed", (int, float), 1.0)
    if speed != 1.0:
        raise P.ProtocolError(P.UNSUPPORTED, "speed other than 1.0 is not offered")
    instructions = _field(body, "instructions", str) or None  # the engine refuses it where the model has no use
    if instructions is not None:
        P.check_unicode(instructions, "instructions")
    voice = body.get("voice")
    if isinstance(voice, dict):  # OpenAI's custom-voice form {"id": ...}
        voice = voice.get("id")
    ref_audio = _field(body, "ref_audio", str)
    if ref_audio is not None:
        spec = P.parse_voice({"ref_audio": ref_audio, "ref_text": _field(body, "ref_text", str),
                              "x_vector_only": _field(body, "x_vector_only", bool, False)}, s.max_upload_bytes)
    elif voice is None:
        spec = None
    elif isinstance(voice, str):
        spec = P.parse_voice(voice.strip().lower(), s.max_upload_bytes)
    else:
        raise P.ProtocolError(P.INVALID_MESSAGE, "voice must be a name or {\"id\": name}")
    # The one validation of sampling options every route shares (the WebSocket's start uses it too).
    sampling = P.parse_sampling({"seed": body.get("seed")})
    language = P.language_name(_field(body, "language", str, "auto") or "auto")
    start = P.Start(voice=spec, language=language, encoding="pcm_s16le", sampling=sampling, instruct=instructions)
    return start, text, fmt, stream_format, streamed


async def handle(request: web.Request) -> web.StreamResponse:
    state = get_state(request)
    try:
        body = await json_body(request)
        start, text, fmt, stream_format, streamed = parse(body, state)
        engine = state.require_engine()
        state.check_language(start.language)
        state.acquire_slot(request_key(request))
    except P.ProtocolError as e:
        return error_response(e, state)
    try:
        try:
            voice, voice_name = await state.voice_prompt(start.voice)
        except P.ProtocolError as e:
            return error_response(e, state)
        state.metrics.input_chars.inc(len(text))
        req = state.request(text, voice, start, f"http-{uuid.uuid4().hex[:16]}", voice_name if voice is None else None)
        track = Tracker(state.metrics, engine.sample_rate, req.request_id, voice_name)
        async with contextlib.aclosing(stream_audio(engine, req, state.watch)) as stream:
            if not streamed:
                try:
                    return await _whole_file(request, stream, fmt, track, engine.sample_rate, state)
                except ConnectionError:  # the client went away; stream_audio's exit cancels the request
                    track.abandoned("client_gone")
                    return web.Response(status=499)
                except Exception as e:  # an engine that raises instead of reporting
                    log.exception("speech request failed")
                    track.abandoned("error")
                    return error_response(P.ProtocolError(P.SYNTHESIS_ERROR, f"{type(e).__name__}: {e}"), state)
            return await _streamed(request, stream, fmt, stream_format, track, engine.sample_rate, state, len(text))
    finally:
        state.release_slot(request_key(request))


async def _whole_file(request: web.Request, stream, fmt: str, track: Tracker, sample_rate: int,
                      state: AppState) -> web.Response:
    parts: list[np.ndarray] = []
    async for item in stream:
        # Nothing is written until the end, so no write notices a client that left: look for it at
        # every chunk (aiohttp drops the transport on connection loss), or it generates to the end.
        if request.transport is None or request.transport.is_closing():
            raise ConnectionError("client went away")
        if isinstance(item, AudioChunk):
            parts.append(item.samples)
            track.sent(item)
        elif failed(item):
            return error_response(track.error(item), state)
        else:
            track.done(item)
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    # Encoding a minute of audio took 1.0 s (mp3) and 2.0 s (opus) here (load 5.4): on the loop, every
    # other stream would stall that long.
    body = await asyncio.get_running_loop().run_in_executor(None, _encode_whole, audio, fmt, sample_rate)
    # A bytes body gets its Content-Length from aiohttp: the client knows the size before it reads.
    headers = {"Content-Type": _content_type(fmt), "Cache-Control": "no-store", "X-Sample-Rate": str(sample_rate)}
    if fmt not in FILE_FORMATS:
        headers["X-Audio-Encoding"] = "pcm_s16le"
    return web.Response(body=body, headers=headers)


def _encode_whole(audio: np.ndarray, fmt: str, sample_rate: int) -> bytes:
    if fmt in FILE_FORMATS:
        return encode_file(audio, fmt, sample_rate)
    pcm = encode_pcm(audio, "pcm_s16le")
    return wav_header(sample_rate, "pcm_s16le", len(pcm)) + pcm if fmt == "wav" else pcm


def _content_type(fmt: str) -> str:
    return FILE_FORMATS[fmt][2] if fmt in FILE_FORMATS else "audio/wav" if fmt == "wav" else "audio/pcm"


async def _streamed(request: web.Request, stream, fmt: str, stream_format: str, track: Tracker, sample_rate: int,
                    state: AppState, n_chars: int) -> web.StreamResponse:
    # Status and headers go out with the first audio, so an error before it is still a clean 4xx/5xx.
    resp: web.StreamResponse | None = None
    sse = stream_format == "sse"
    timeout = state.settings.write_timeout_s

    async def write(data: bytes) -> None:
        assert resp is not None
        try:
            await asyncio.wait_for(resp.write(data), timeout)
        except asyncio.TimeoutError as e:  # aiohttp has no write timeout: a client that stops reading
            if request.transport is not None:  # would hold its slot and engine request forever
                request.transport.abort()
            raise ConnectionError("client stopped reading") from e

    try:
        async for item in stream:
            if isinstance(item, Finished):
                if failed(item):
                    e = track.error(item)
                    if resp is None:
                        return error_response(e, state)
                    if sse:
                        await write(_event(P.error(e.code, e.message)))
                    log.warning("speech request failed mid-stream: %s", e.message)
                    return resp  # a raw audio body can only end early; the client sees a short body
                done = track.done(item)
                if resp is None:
                    resp = await _prepare(request, fmt, sse, sample_rate)
                if sse:
                    # No text tokens here: input counts characters, output counts frames (80 ms each).
                    usage = {"input_tokens": n_chars, "output_tokens": done["frames"]}
                    usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
                    await write(_event({"type": "speech.audio.done", "usage": usage}))
                await resp.write_eof()
                return resp
            if resp is None:
                resp = await _prepare(request, fmt, sse, sample_rate)
            pcm = encode_pcm(item.samples, "pcm_s16le")
            track.sent(item)  # stamped as handed to the socket, as on the WebSocket (server/speak.py)
            await write(_event({"type": "speech.audio.delta", "audio": base64.b64encode(pcm).decode()}) if sse
                        else pcm)
    except ConnectionError:  # the client went away; stream_audio's exit cancels the request
        track.abandoned("client_gone")
    except Exception as e:  # an engine that raises instead of reporting
        log.exception("speech request failed")
        track.abandoned("error")
        if resp is None:
            return error_response(P.ProtocolError(P.SYNTHESIS_ERROR, f"{type(e).__name__}: {e}"), state)
    return resp if resp is not None else web.Response(status=499)


async def _prepare(request: web.Request, fmt: str, sse: bool, sample_rate: int) -> web.StreamResponse:
    ctype = "text/event-stream" if sse else _content_type(fmt)
    resp = web.StreamResponse(headers={"Content-Type": ctype, "Cache-Control": "no-store",
                                       "X-Sample-Rate": str(sample_rate), "X-Audio-Encoding": "pcm_s16le"})
    await resp.prepare(request)
    limit_send_buffer(request.transport, get_state(request).settings.send_buffer_bytes)
    if fmt == "wav" and not sse:
        await resp.write(wav_header(sample_rate, "pcm_s16le"))
    return resp


def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()
