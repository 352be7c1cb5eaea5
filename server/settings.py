"""Every knob the server has, in one dataclass, with the reason for each default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerSettings:
    model_name: str = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"
    noise_model: bool = False  # a random checkpoint: say so in logs, /api/v1/info and on the page
    voices_dir: Path | None = None  # None: voices live in memory only (tests, throwaway runs)
    default_voice: str | None = None
    max_sessions: int = 64  # WebSocket sessions + HTTP speech requests at once; more get OVERLOADED
    auth_tokens: frozenset[str] = frozenset()  # empty: no authentication
    # Origins allowed to open sockets and POST; empty: same origin only (plus clients that send no
    # Origin, i.e. not browsers). "*" allows every origin.
    allowed_origins: frozenset[str] = frozenset()
    max_text_chars: int = 4096  # per utterance, OpenAI's cap
    max_upload_bytes: int = 8 * 2**20  # reference audio as sent (file or base64-decoded)
    max_ref_seconds: float = 30.0  # decoded duration: a 132 KiB FLAC can decode to 30 min of audio
    # Client→server frames are JSON; the largest legitimate one is a start with inline base64 audio.
    ws_max_message_bytes: int = 8 * 2**20 * 4 // 3 + 2**16
    heartbeat_s: float = 15.0  # below nginx's 60 s proxy_read_timeout and common LB idle timeouts
    idle_timeout_s: float = 120.0  # no client message (pings/pongs do not count) and nothing to synthesize → close
    # A socket that has not started after this long is closed, giving its connection back.
    start_timeout_s: float = 30.0
    # WebSocket connections open at once, started or not. A session slot (max_sessions) is taken at
    # start, so sockets that never start cannot crowd out clients that speak; this bounds them instead.
    max_connections: int = 256
    write_timeout_s: float = 30.0  # aiohttp has no write timeout; a client that never reads is dropped
    # The kernel send buffer of an audio stream (limits.limit_send_buffer; Linux doubles it to 256 KB,
    # ~2.7 s of 16-bit audio): more than a fast link keeps in flight, so a stalled reader is noticed
    # within write_timeout_s rather than minutes later.
    send_buffer_bytes: int = 128 * 1024
    max_queued_utterances: int = 64  # per session
    max_append_chars: int = 16384  # unflushed text an append stream may hold
    voice_cache_size: int = 64  # prepared voice prompts kept in memory
    # The voice store's quota (0: none). A stored voice is its clip as 16-bit 24 kHz mono (at most
    # max_ref_seconds: 1.4 MB) plus its prompt (a few KB): 1000 voices fit in well under 2 GiB.
    max_voices: int = 1000
    max_voices_bytes: int = 2 * 2**30
    voice_cache_ttl_s: float = 3600.0
    drain_timeout_s: float = 30.0  # on SIGTERM, how long running streams may finish
    # Per-token limits (per client connection when there is no auth). Each replica counts its own:
    # behind N replicas a token may hold up to N x max_sessions_per_token.
    max_sessions_per_token: int = 0  # sockets + HTTP speech requests one token holds at once; 0: no limit
    # Client messages (WebSocket frames, HTTP API requests) per second, as a token bucket: an LLM
    # streaming tokens through append sends tens a second, a flood thousands.
    max_messages_per_s: float = 100.0  # 0: no limit
    message_burst: int = 200  # messages allowed at once above the rate
    # Failed token checks per client address: a burst for typos and restarts, then one every 2 s;
    # beyond it RATE_LIMITED (429, Retry-After) before the token is looked at. 0: no throttle.
    auth_failures_per_s: float = 0.5
    auth_failure_burst: int = 20
    # Health: engine work waited on with no output from the engine at all for this long means the
    # engine is stuck (e.g. its thread died); /health turns 503 so an orchestrator restarts the process.
    engine_stall_s: float = 60.0
