"""HTTP routes of the voice registry: create (multipart upload or JSON with base64), list, get, delete."""

from __future__ import annotations

from aiohttp import BodyPartReader, web

from server import protocol as P
from server.bodies import json_body
from server.speak import error_response
from server.state import AppState, get_state
from server.voices import slug

TRUE = {"1", "true", "yes", "on"}
FALSE = {"", "0", "false", "no", "off"}
MAX_FIELD_BYTES = 16384
# Everything but the clip: a form has a handful of short fields. Without a total, 12,800 fields
# (205 MB) were read before the answer.
MAX_FIELDS_TOTAL_BYTES = 65536
MAX_PARTS = 64


async def _read_multipart(request: web.Request, max_bytes: int) -> tuple[dict[str, str], bytes | None]:
    """Fields as text, plus the audio file's bytes; the file and the body as a whole are size-capped
    while read."""
    fields: dict[str, str] = {}
    audio = None
    field_bytes = 0
    reader = await request.multipart()
    parts = 0
    while (part := await reader.next()) is not None:
        parts += 1
        if parts > MAX_PARTS:
            raise P.ProtocolError(P.BODY_TOO_LARGE, f"a voice upload has at most {MAX_PARTS} parts")
        if not isinstance(part, BodyPartReader):
            raise P.ProtocolError(P.INVALID_MESSAGE, "nested multipart bodies are not accepted")
        if part.name == "audio" or part.filename:
            if audio is not None:
                raise P.ProtocolError(P.INVALID_MESSAGE, "send one audio file")
            buf = bytearray()
            while chunk := await part.read_chunk(65536):
                buf += chunk
                if len(buf) > max_bytes:
                    raise P.ProtocolError(P.AUDIO_TOO_LARGE, f"the audio file is over the {max_bytes} byte limit")
            audio = bytes(buf)
        else:
            value = bytearray()
            while chunk := await part.read_chunk(4096):
                value += chunk
                field_bytes += len(chunk)
                if len(value) > MAX_FIELD_BYTES:
                    raise P.ProtocolError(P.INVALID_MESSAGE, f"field {(part.name or '')[:32]!r} is too long")
                if field_bytes > MAX_FIELDS_TOTAL_BYTES:
                    raise P.ProtocolError(P.BODY_TOO_LARGE, f"the form's fields are over {MAX_FIELDS_TOTAL_BYTES} "
                                                            "bytes in all")
            if part.name:
                fields[part.name] = part.decode(bytes(value)).decode("utf-8", errors="replace")
    return fields, audio


async def create(request: web.Request) -> web.Response:
    state = get_state(request)
    s = state.settings
    try:
        engine = state.require_engine()
        if request.content_type == "application/json":
            body = await json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("ref_audio"), str):
                raise P.ProtocolError(P.INVALID_MESSAGE, "JSON voice uploads need ref_audio (base64)")
            audio = P.decode_base64_audio(body["ref_audio"], s.max_upload_bytes)
            fields = {k: P.check_unicode(str(v).lower() if isinstance(v, bool) else str(v), k[:32])
                      for k, v in body.items() if k != "ref_audio" and v is not None}
            transcript = fields.get("ref_text", fields.get("transcript"))
        elif request.content_type.startswith("multipart/"):
            fields, audio = await _read_multipart(request, s.max_upload_bytes)
            transcript = fields.get("transcript", fields.get("ref_text"))
        elif request.content_type == "application/x-www-form-urlencoded":  # a form without its file
            fields, audio = {k: str(v) for k, v in (await request.post()).items()}, None
            transcript = fields.get("transcript")
        else:
            raise P.ProtocolError(P.INVALID_MESSAGE, "send multipart/form-data (audio, transcript, name, "
                                                     "x_vector_only) or JSON")
        if not audio:
            raise P.ProtocolError(P.INVALID_AUDIO, "no audio: attach the reference clip as the 'audio' field")
        flag = fields.get("x_vector_only", "false").strip().lower()
        if flag not in TRUE | FALSE:
            raise P.ProtocolError(P.INVALID_MESSAGE, "x_vector_only must be true or false")
        x_vector_only = flag in TRUE
        transcript = (transcript or "").strip() or None
        if not x_vector_only and transcript is None:
            raise P.ProtocolError(P.INVALID_MESSAGE, "a transcript of the clip is needed, or set x_vector_only")
        if transcript is not None and len(transcript) > s.max_text_chars:
            raise P.ProtocolError(P.TEXT_TOO_LONG, "the transcript is too long")
        name = fields.get("name", "").strip()[:128]
        voice_id = fields.get("voice_id", "").strip() or slug(name)
        if not name:
            name = voice_id
        if not voice_id:
            raise P.ProtocolError(P.INVALID_VOICE_ID, "give the voice a name (or voice_id)")
        language = fields.get("language", "auto").strip().lower() or "auto"
        state.check_language(language)
        info = await state.voices.create(engine, voice_id, name, audio, transcript, x_vector_only, language,
                                         s.max_ref_seconds)
    except P.ProtocolError as e:
        return error_response(e, state)
    return web.json_response(info.public(), status=201)


async def list_voices(request: web.Request) -> web.Response:
    state = get_state(request)
    await state.voices.refresh()  # other replicas sharing the directory may have changed it
    return web.json_response({"voices": [v.public() for v in state.voices.list()],
                              "default": state.settings.default_voice})


def _lookup(request: web.Request, state: AppState) -> str:
    voice_id = request.match_info["voice_id"]
    if not P.VOICE_ID.match(voice_id) or state.voices.info(voice_id) is None:
        raise P.ProtocolError(P.VOICE_NOT_FOUND, f"no voice named {voice_id[:64]!r}")
    return voice_id


async def get_voice(request: web.Request) -> web.Response:
    state = get_state(request)
    try:
        info = state.voices.info(_lookup(request, state))
    except P.ProtocolError as e:
        return error_response(e, state)
    assert info is not None
    return web.json_response(info.public())


async def delete_voice(request: web.Request) -> web.Response:
    state = get_state(request)
    try:
        await state.voices.delete(_lookup(request, state))
    except P.ProtocolError as e:
        return error_response(e, state)
    return web.json_response({"deleted": request.match_info["voice_id"]})


def routes() -> list[web.RouteDef]:
    return [web.post("/api/v1/voices", create), web.get("/api/v1/voices", list_voices),
            web.get("/api/v1/voices/{voice_id}", get_voice), web.delete("/api/v1/voices/{voice_id}", delete_voice)]
