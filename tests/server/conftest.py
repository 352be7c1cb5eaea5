"""Server tests: ``async def`` tests run in a fresh event loop with a time limit (no plugin needed),
and helpers to build an app around the fake engine and talk to it over loopback."""

from __future__ import annotations

import base64
import contextlib
import io

import numpy as np
import pytest
import soundfile as sf
from aiohttp.test_utils import TestClient, TestServer

from server.app import create_app
from server.settings import ServerSettings
from tests.coroutine_tests import run_coroutine_test
from tests.server.fake_engine import FakeEngine

TEST_TIMEOUT_S = 30.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    return run_coroutine_test(pyfuncitem, TEST_TIMEOUT_S)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timeout(seconds): time limit of an async server test")


def wav_bytes(seconds: float = 1.0, sr: int = 16000, freq: float = 220.0, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@contextlib.asynccontextmanager
async def serve(engine: FakeEngine | None = None, voices: dict[str, bytes] | None = None, **settings):
    """A running app on loopback and a client for it. ``voices``: name → WAV bytes to register first
    (x-vector only)."""
    engine = FakeEngine() if engine is None and "no_engine" not in settings else engine
    settings.pop("no_engine", None)
    app = create_app(engine, ServerSettings(**settings))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        for name, audio in (voices or {}).items():
            from server.state import STATE

            await app[STATE].voices.create(engine, name, name, audio, None, True, "auto", 30.0)
        yield client
    finally:
        await client.close()


async def recv_json(ws, timeout: float = 5.0) -> dict:
    """The next JSON message, skipping binary audio."""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type.name == "TEXT":
            import json

            return json.loads(msg.data)
        if msg.type.name != "BINARY":
            raise AssertionError(f"socket ended: {msg.type.name} {msg.data} {msg.extra}")


async def collect_utterance(ws, timeout: float = 10.0) -> tuple[bytes, dict, list[dict]]:
    """Audio bytes until the next complete or error; returns (audio, final message, others seen)."""
    import json

    audio, others = bytearray(), []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type.name == "BINARY":
            audio += msg.data
        elif msg.type.name == "TEXT":
            m = json.loads(msg.data)
            if m["type"] in ("complete", "error"):
                return bytes(audio), m, others
            others.append(m)
        else:
            raise AssertionError(f"socket ended: {msg.type.name} {msg.data}")
