"""Per-token limits: how many sessions a token holds at once and how fast its messages may come.

The key is the client's token when the server has tokens (the guard checked it before any handler
runs, so keys come from the configured set and the tables stay bounded). Without auth there is no
token to count against: each connection gets its own message bucket and only ``max_sessions``
bounds sessions. Each replica counts alone; docs/protocol.md says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections import Counter, OrderedDict

from aiohttp import web

from server import protocol as P
from server.settings import ServerSettings

# The request entry the guard fills with the accepted token. web.RequestKey (aiohttp >= 3.13) avoids
# a warning; older aiohttp takes a plain string.
TOKEN_KEY = web.RequestKey("makima_token", str) if hasattr(web, "RequestKey") else "makima.token"


class TokenBucket:
    """``rate`` messages a second on average, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, max(1, burst)
        self.tokens = float(self.burst)
        self.at = time.monotonic()

    def refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        self.refill()
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Limits:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.sessions: Counter[str] = Counter()  # token → sessions and HTTP speech requests held
        self._buckets: dict[str, TokenBucket] = {}
        self.auth = AuthThrottle(settings.auth_failures_per_s, settings.auth_failure_burst)

    def new_bucket(self) -> TokenBucket:
        return TokenBucket(self.settings.max_messages_per_s, self.settings.message_burst)

    def bucket(self, key: str | None) -> TokenBucket:
        """The token's shared bucket; a fresh one (for one connection) when there is no token."""
        if key is None:
            return self.new_bucket()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = self.new_bucket()
        return b

    def open(self, key: str | None) -> None:
        cap = self.settings.max_sessions_per_token
        if key is None or cap <= 0:
            return
        if self.sessions[key] >= cap:
            raise P.ProtocolError(P.RATE_LIMITED, f"this token already holds its limit of {cap} sessions; close one "
                                                  "or retry later")
        self.sessions[key] += 1

    def close(self, key: str | None) -> None:
        if key is None or self.settings.max_sessions_per_token <= 0:
            return
        self.sessions[key] -= 1
        if self.sessions[key] <= 0:
            del self.sessions[key]


class AuthThrottle:
    """Failed token checks per client address: ``burst`` at once, then ``rate`` a second (~1,050
    guesses a second were measured without it). A throttled address is refused before its token is
    even looked at, so a right guess cannot be told from a wrong one while it lasts. Behind a proxy
    every client shares the proxy's address: throttle there too (deploy/README.md)."""

    MAX_ADDRESSES = 4096  # oldest forgotten first: the table stays bounded under a spoofing flood

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def retry_after(self, address: str) -> int:
        """Seconds until this address may try a token again; 0: now."""
        b = self._buckets.get(address)
        if b is None or self.rate <= 0:
            return 0
        b.refill()
        return 0 if b.tokens >= 1.0 else math.ceil((1.0 - b.tokens) / self.rate)

    def failed(self, address: str) -> None:
        if self.rate <= 0:
            return
        b = self._buckets.pop(address, None) or TokenBucket(self.rate, self.burst)
        self._buckets[address] = b
        b.take()
        while len(self._buckets) > self.MAX_ADDRESSES:
            self._buckets.popitem(last=False)


def limit_send_buffer(transport: asyncio.BaseTransport | None, nbytes: int) -> None:
    """Make the write deadline measure the client's reading. Linux grows a socket's send buffer to
    4 MB: a client that never read absorbed 3.9 MB (81 s of 16-bit audio) before a send even waited,
    so write_timeout_s started counting only minutes later. With a small buffer a send waits as soon
    as the client stops draining it, and the deadline runs from there."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and nbytes > 0:
        with contextlib.suppress(OSError):  # not a TCP socket (tests), or already gone
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)


def request_key(request: web.Request) -> str | None:
    """The token the guard accepted for this request, or None (no auth)."""
    return request.get(TOKEN_KEY)
