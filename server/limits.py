"""Per-token limits: how many sessions a token holds at once and how fast its messages may come.

The key is the client's token when the server has tokens (the guard checked it before any handler
runs, so keys come from the configured set and the tables stay bounded). Without auth there is no
token to count against: each connection gets its own message bucket and only ``max_sessions``
bounds sessions. Each replica counts alone; docs/protocol.md says so.
"""

from __future__ import annotations

import time
from collections import Counter

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

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class Limits:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.sessions: Counter[str] = Counter()  # token → sessions and HTTP speech requests held
        self._buckets: dict[str, TokenBucket] = {}

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


def request_key(request: web.Request) -> str | None:
    """The token the guard accepted for this request, or None (no auth)."""
    return request.get(TOKEN_KEY)
