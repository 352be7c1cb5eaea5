"""The server in this process, for tests that look inside it: its app state, the engine's KV
blocks, and every ERROR logged (an unhandled exception anywhere in a handler or task is a crash)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import ServerSettings
from server.state import STATE, AppState
from tests.server.conftest import wav_bytes

VOICE = "reliable"


def tiny_engine(tmp: Path, num_kv_blocks: int = 2048):
    """The real engine on a tiny random checkpoint (seed 0), on the CPU."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.random_checkpoint import make_random_checkpoint

    path = make_random_checkpoint(tmp / "tiny", "tiny", seed=0)
    return Engine.from_model(path, EngineConfig(device="cpu", num_kv_blocks=num_kv_blocks))


class Errors(logging.Handler):
    """Collects ERROR records; ``expected`` substrings mark the ones a test provokes on purpose."""

    def __init__(self, expected: tuple[str, ...] = ()) -> None:
        super().__init__(logging.ERROR)
        self.expected, self.records = expected, []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        if not any(e in text for e in self.expected):
            self.records.append(text)


@contextlib.asynccontextmanager
async def live(engine, expected_errors: tuple[str, ...] = (), **settings):
    """(client, state, errors) for a running app around ``engine`` with a registered voice."""
    errors = Errors(expected_errors)
    logging.getLogger().addHandler(errors)
    client = TestClient(TestServer(create_app(engine, ServerSettings(**settings)), host="127.0.0.1"))
    await client.start_server()
    try:
        state = client.app[STATE]
        await state.voices.create(engine, VOICE, VOICE, wav_bytes(1.0, sr=24000, freq=170.0), None, True,
                                  "auto", 30.0)
        yield client, state, errors
    finally:
        await client.close()
        logging.getLogger().removeHandler(errors)


def leftovers(state: AppState) -> dict[str, int]:
    s = state.engine.stats()
    return {"kv_blocks_used": s.kv_blocks_used, "engine_running": s.running, "engine_waiting": s.waiting,
            "slots": state.active, "sessions": len(state.sessions), "streams_awaited": state.watch.waiting}


async def settle(state: AppState, timeout: float = 30.0) -> tuple[dict[str, int], float]:
    """Wait until nothing is left over; returns what is left (all zero when settled) and how long it took."""
    t0 = time.monotonic()
    while any(leftovers(state).values()) and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.05)
    return leftovers(state), time.monotonic() - t0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
