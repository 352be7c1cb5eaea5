"""What OpenAI clients expect around ``POST /v1/audio/speech`` (server/openai.py): OpenAI's error
body on every ``/v1/`` route, ``GET /v1/models`` and ``GET /v1/audio/voices``.

Errors are reshaped in one middleware, by route prefix, so no handler needs to know which API it
belongs to. The native fields (``code``, ``message``) stay beside ``error`` for clients of the
rest of this server's API.
"""

from __future__ import annotations

import json

from aiohttp import web

from server.state import BUILTIN_VOICE, OPENAI_VOICES, get_state

PREFIX = "/v1/"
# OpenAI's error "type" by HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error"}


def openai_error(status: int, code: str, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": None}, "code": code,
            "message": message}


def _reshaped(resp: web.StreamResponse) -> web.StreamResponse:
    if resp.status < 400 or not isinstance(resp, web.Response) or resp.content_type != "application/json":
        return resp
    try:
        body = json.loads(resp.body or b"{}")
    except (TypeError, ValueError):
        return resp
    if not isinstance(body, dict) or "error" in body:
        return resp
    out = web.json_response(openai_error(resp.status, str(body.get("code", "ERROR")), str(body.get("message", ""))),
                            status=resp.status)
    for name, value in resp.headers.items():  # Retry-After, WWW-Authenticate, CORS
        if name.lower() not in ("content-type", "content-length"):
            out.headers[name] = value
    return out


@web.middleware
async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
    if not request.path.startswith(PREFIX):
        return await handler(request)
    try:
        return _reshaped(await handler(request))
    except web.HTTPException as e:  # aiohttp's own 404/405 for /v1/ paths nobody serves
        if e.status < 400:
            raise
        return web.json_response(openai_error(e.status, e.reason.upper().replace(" ", "_"), e.text or e.reason),
                                 status=e.status)


async def models(request: web.Request) -> web.Response:
    state = get_state(request)
    return web.json_response({"object": "list", "data": [
        {"id": state.settings.model_name, "object": "model", "created": 0, "owned_by": "makima-tts"}]})


async def voices(request: web.Request) -> web.Response:
    """Registered voices, then OpenAI's names that are not registered (they speak with the default voice)."""
    state = get_state(request)
    default = state.settings.default_voice or BUILTIN_VOICE
    registered = [{"id": v.voice_id, "name": v.speaker, "object": "voice"} for v in state.voices.list()]
    taken = {v["id"] for v in registered}
    aliases = [{"id": name, "name": name, "object": "voice", "alias_of": default}
               for name in sorted(OPENAI_VOICES - taken)]
    return web.json_response({"object": "list", "data": registered + aliases, "default": default})


def routes() -> list[web.RouteDef]:
    return [web.get("/v1/models", models), web.get("/v1/audio/voices", voices)]
