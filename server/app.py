"""The aiohttp application: routes, the auth/origin guard, health and readiness, drain, shutdown.

``create_app`` takes the engine as a value (tests pass a fake; ``makima-tts serve`` passes None and
attaches the real one when its model has loaded, so /health answers during the load and /ready
turns true after it).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, web

from engine.api import ModelInfo, TTSEngine
from server import cors, nari, openai, openai_compat, speak, voice_api
from server import protocol as P
from server.lifecycle import drain as drain  # re-exported: callers and tests know it here
from server.lifecycle import exit_after_drain_on_sigterm as exit_after_drain_on_sigterm
from server.limits import TOKEN_KEY
from server.metrics import CONTENT_TYPE
from server.settings import ServerSettings
from server.speak import SUBPROTOCOL, error_response
from server.state import STATE, AppState, get_state
from server.voices import VoiceRegistry

log = logging.getLogger("makima.server")
STATIC = Path(__file__).parent / "static"
LOADER: web.AppKey[asyncio.Task] = web.AppKey("makima_loader", asyncio.Task)
GUARDED = ("/api/", "/v1/")  # everything that synthesizes or changes state; pages, probes and metrics are open
OPEN = frozenset({"/api/v1/info"})  # the page reads it to learn whether it must ask for a token


def _guarded(request: web.Request) -> bool:
    # Decide by the route that matched, not the raw path, so no spelling of a URL reaches a
    # guarded handler unguarded; unmatched paths are guarded too (they only ever get a 404/405).
    info = request.match_info
    resource = info.route.resource if info.route is not None else None
    canonical = resource.canonical if resource is not None else None
    if canonical is None:
        return True
    return canonical.startswith(GUARDED) and canonical not in OPEN
TOKEN_PREFIX = "bearer."  # browsers cannot set headers on a WebSocket: the token rides in a subprotocol
PAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; media-src 'self' blob:; "
                                           "style-src 'self' 'unsafe-inline'; img-src 'self' data:"}


def _origin_allowed(request: web.Request, allowed: frozenset[str], auth: bool) -> bool:
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:  # non-browser clients send none; they authenticate by token
        return True
    if origin.rstrip("/").lower() in allowed:
        return True
    # Same origin: compare host:port only, since a TLS-terminating proxy changes the scheme we see.
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "http://[" and the like: no origin we could allow
        return False
    host = (request.host or "").lower()
    if netloc.lower() != host:
        return False
    # Host alone proves nothing: a page on evil.example whose DNS is rebound to 127.0.0.1 sends
    # Origin and Host evil.example and would pass. Without tokens, trust "same origin" only for a
    # Host no DNS answer can rebind (an IP address or localhost); name other origins in --allowed-origins.
    return auth or _is_literal_host(host)


def _is_literal_host(host: str) -> bool:
    if host.startswith("["):  # [v6]:port
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _token(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(TOKEN_PREFIX):
            return proto[len(TOKEN_PREFIX):]
    return None


def _token_ok(token: str | None, tokens: frozenset[str]) -> bool:
    # Accepted tokens are ASCII (cli._read_tokens); a header may decode to anything, lone surrogates
    # included, which str.encode refuses: such a token is simply wrong.
    if token is None or not token.isascii():
        return False
    # Compare against every token without stopping early: timing says nothing about which matched.
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(token.encode(), t.encode())
    return ok


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    if cors.is_preflight(request):  # before the token check: browsers send no token on a preflight
        return cors.preflight(request, get_state(request).settings.allowed_origins)
    if _guarded(request):
        state = get_state(request)
        s = state.settings
        if not _origin_allowed(request, s.allowed_origins, bool(s.auth_tokens)):
            return error_response(P.ProtocolError(P.FORBIDDEN, "this Origin may not use the API"), state)
        if s.auth_tokens:
            address = request.remote or ""
            wait = state.limits.auth.retry_after(address)
            if wait:
                return error_response(P.ProtocolError(P.RATE_LIMITED, "too many failed token checks from this "
                                                                      f"address; retry in {wait} s"), state,
                                      headers={"Retry-After": str(wait)})
            token = _token(request)
            if not _token_ok(token, s.auth_tokens):
                state.limits.auth.failed(address)
                why = "missing token" if token is None else "wrong token"
                return error_response(P.ProtocolError(P.UNAUTHORIZED, f"{why}: send Authorization: Bearer TOKEN, or "
                                                                      f"on a WebSocket the subprotocols {SUBPROTOCOL}, "
                                                                      f"{TOKEN_PREFIX}TOKEN"), state,
                                      headers={"WWW-Authenticate": "Bearer"})
            request[TOKEN_KEY] = token  # the key of the per-token limits
            # Each request (a socket's handshake included) is one message of the token's rate.
            if not state.limits.bucket(token).take():
                return error_response(P.ProtocolError(P.RATE_LIMITED, f"over {s.max_messages_per_s:g} messages a "
                                                                      "second for this token"), state,
                                      headers={"Retry-After": "1"})
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    # Liveness: the event loop answers, and the engine is not stuck with work owed (server/watch.py).
    state = get_state(request)
    stalled = state.watch.stalled_for()
    if stalled > state.settings.engine_stall_s:
        return web.json_response({"status": "engine stalled", "stalled_s": round(stalled, 1)}, status=503)
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = get_state(request)
    if state.ready:
        return web.json_response({"ready": True})
    reason = "draining" if state.draining else ("load failed: " + state.load_error if state.load_error
                                                else "loading: " + state.load_progress)
    return web.json_response({"ready": False, "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = get_state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def info(request: web.Request) -> web.Response:
    state = get_state(request)
    s, e = state.settings, state.engine
    return web.json_response({
        "model": s.model_name, "noise": s.noise_model, "ready": state.ready, "progress": state.load_progress,
        "error": state.load_error, "sample_rate": e.sample_rate if e else 24000,
        "languages": list(e.languages) if e else [], "encodings": list(P.ENCODINGS),
        "auth_required": bool(s.auth_tokens), "subprotocol": SUBPROTOCOL, "max_text_chars": s.max_text_chars,
        "max_ref_seconds": s.max_ref_seconds, "default_voice": s.default_voice,
        **_model_offer(getattr(e, "model_info", None)),
        "precision": getattr(e, "precision", None)})  # the engine's weight format and why (engine/precision.py)


def _model_offer(info: ModelInfo | None) -> dict:
    """What the loaded variant serves: its speakers (CustomVoice), whether it follows an instruction
    and clones reference audio. Until the model is loaded: unknown (None)."""
    if info is None:
        return {"model_type": None, "speakers": [], "instructions": None, "voice_cloning": None}
    return {"model_type": info.model_type, "speakers": list(info.speakers), "instructions": info.takes_instructions,
            "voice_cloning": info.clones_voices}


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "speak.html", headers=PAGE_HEADERS)


async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/speak")


def attach_engine(app: web.Application, engine: TTSEngine) -> None:
    state = app[STATE]
    state.engine, state.load_error, state.load_progress = engine, None, "loaded"
    state.metrics.ready.set(0 if state.draining else 1)


def load_failed(app: web.Application, message: str) -> None:
    state = app[STATE]
    state.load_error, state.load_progress = message, "failed"
    state.metrics.ready.set(0)


def _exit_server() -> None:
    raise web.GracefulExit()  # a SystemExit: web.run_app leaves its loop and shuts the app down


def load_in_background(app: web.Application, load: Callable[[Callable[[str], None]], TTSEngine],
                       exit_on_failure: bool = False) -> None:
    """Start serving at once and load the model in a thread: /health answers, /ready says
    "loading: ..." with progress, and the engine is attached when ``load(progress)`` returns.
    If it raises, /ready and every client get the reason; with ``exit_on_failure`` (``makima-tts
    serve``) the server also stops, so the process exits and its supervisor sees the failure."""

    async def start(app: web.Application) -> None:
        loop, state = asyncio.get_running_loop(), app[STATE]

        def progress(message: str) -> None:
            log.info("%s", message)
            loop.call_soon_threadsafe(setattr, state, "load_progress", message)

        async def run() -> None:
            try:
                engine = await loop.run_in_executor(None, load, progress)
            except Exception as e:  # reported by /ready and to every client as TTS_UNAVAILABLE
                # One line: the reason is in the message; the traceback only helps a developer.
                message = " ".join(f"{type(e).__name__}: {e}".split())  # hub errors carry newlines
                log.error("loading the model failed: %s", message)
                log.debug("loading the model failed", exc_info=True)
                load_failed(app, message)
                if exit_on_failure:
                    loop.call_soon(_exit_server)
                return
            attach_engine(app, engine)
            log.info("ready")

        app[LOADER] = asyncio.create_task(run())

    async def cleanup(app: web.Application) -> None:
        app[LOADER].cancel()
        shutdown = getattr(app[STATE].engine, "shutdown", None)
        if shutdown is not None:
            await asyncio.get_running_loop().run_in_executor(None, shutdown)

    app.on_startup.append(start)
    app.on_cleanup.append(cleanup)


async def _add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    cors.add_headers(request, response, request.app[STATE].settings.allowed_origins)


async def _on_startup(app: web.Application) -> None:
    state = app[STATE]
    await asyncio.get_running_loop().run_in_executor(None, state.voices.load)
    if state.settings.default_voice and state.voices.info(state.settings.default_voice) is None:
        log.warning("default voice %r is not in the registry; sessions must name a voice",
                    state.settings.default_voice)


async def _on_shutdown(app: web.Application) -> None:
    # Sockets still open after the drain: tell clients to reconnect elsewhere. All at once: each close
    # waits up to 10 s for the client's reply, and a stuck client must not hold up the others.
    state = app[STATE]
    await asyncio.gather(*(s.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                           for s in list(state.sessions)), return_exceptions=True)
    await asyncio.gather(*list(state.background), return_exceptions=True)  # the drain's own closes


def create_app(engine: TTSEngine | None, settings: ServerSettings) -> web.Application:
    # Bodies: a JSON speech request or voice upload carries at most the base64 of max_upload_bytes.
    # openai_errors outermost, so the guard's refusals on /v1/ routes get OpenAI's shape too.
    app = web.Application(middlewares=[openai_compat.openai_errors, guard],
                          client_max_size=settings.ws_max_message_bytes)
    state = AppState(settings=settings, voices=VoiceRegistry(settings.voices_dir, settings.voice_cache_size,
                                                             settings.voice_cache_ttl_s, settings.max_voices,
                                                             settings.max_voices_bytes))
    app[STATE] = state
    if engine is not None:
        attach_engine(app, engine)
    app.add_routes([
        web.get("/health", health), web.get("/ready", ready), web.get("/metrics", metrics),
        web.get("/api/v1/info", info), web.get("/api/v1/speak", speak.handle),
        web.post("/v1/audio/speech", openai.handle), web.get("/v1/audio/speech/ws", nari.handle),
        *openai_compat.routes(), *voice_api.routes(),
        web.get("/", root), web.get("/speak", page),
    ])
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_response_prepare.append(_add_cors_headers)
    return app
