"""Reading an HTTP request's JSON body into a value or a coded error, for every route that takes one."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from server import protocol as P


async def json_body(request: web.Request) -> Any:
    try:
        return await request.json(loads=P.loads)
    except LookupError as e:  # Content-Type: application/json; charset=bogus names no codec Python has
        raise P.ProtocolError(P.UNSUPPORTED, f"charset {request.charset!r} is not supported; send UTF-8") from e
    except ValueError as e:  # bad JSON, bad UTF-8, NaN/Infinity
        raise P.ProtocolError(P.INVALID_MESSAGE, f"the body is not valid JSON: {e}") from e
