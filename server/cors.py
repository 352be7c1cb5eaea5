"""CORS for the HTTP routes, driven by --allowed-origins (the WebSocket checks Origin in the guard).

A page on an allowed origin may call the speech and voice routes from fetch(): its preflight
(OPTIONS with Access-Control-Request-Method) is answered before any token check, since browsers
send no Authorization on a preflight, and every response to it names the origin so the browser
lets the page read bodies, coded errors included. Same-origin pages need none of this.
"""

from __future__ import annotations

from aiohttp import web

from server import protocol as P

METHODS = "GET, POST, DELETE, OPTIONS"
HEADERS = "Authorization, Content-Type"
EXPOSE = "Retry-After, X-Sample-Rate, X-Audio-Encoding, WWW-Authenticate"
MAX_AGE_S = "600"


def cross_origin(request: web.Request, allowed: frozenset[str]) -> str | None:
    """The request's Origin when it is one --allowed-origins lets in, else None."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    return origin if "*" in allowed or origin.rstrip("/").lower() in allowed else None


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def preflight(request: web.Request, allowed: frozenset[str]) -> web.Response:
    origin = cross_origin(request, allowed)
    if origin is None:
        return web.json_response(P.error(P.FORBIDDEN, "this Origin may not use the API"), status=403)
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": METHODS,
        "Access-Control-Allow-Headers": HEADERS, "Access-Control-Max-Age": MAX_AGE_S, "Vary": "Origin"})


def add_headers(request: web.Request, response: web.StreamResponse, allowed: frozenset[str]) -> None:
    """On every response (a signal, so streamed bodies and the guard's own refusals get it too)."""
    origin = cross_origin(request, allowed)
    if origin is not None and response.status != 101:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE
        response.headers.add("Vary", "Origin")
