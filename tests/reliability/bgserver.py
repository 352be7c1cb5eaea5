"""The app in a background thread with its own event loop, so that synchronous tests (hypothesis
examples) can each run a short client with ``asyncio.run`` against one long-lived server."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from aiohttp import web

from server.app import create_app
from server.settings import ServerSettings
from server.state import STATE, AppState
from tests.reliability.inproc import VOICE, Errors, leftovers
from tests.server.conftest import wav_bytes


class BackgroundServer:
    def __init__(self, engine, voices_dir: Path | None = None, **settings) -> None:
        self.engine = engine
        self.errors = Errors()
        logging.getLogger().addHandler(self.errors)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bg-server", daemon=True)
        self.thread.start()
        self.app = create_app(engine, ServerSettings(voices_dir=voices_dir, **settings))
        self.runner = web.AppRunner(self.app)
        self.port = self.call(self._start())

    async def _start(self) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        await self.state.voices.create(self.engine, VOICE, VOICE, wav_bytes(1.0, sr=24000, freq=170.0),
                                       None, True, "auto", 30.0)
        return site._server.sockets[0].getsockname()[1]

    @property
    def state(self) -> AppState:
        return self.app[STATE]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def leftovers(self) -> dict[str, int]:
        async def read() -> dict[str, int]:
            return leftovers(self.state)

        return self.call(read())

    def settle(self, timeout: float = 20.0) -> dict[str, int]:
        from tests.reliability.inproc import settle

        return self.call(settle(self.state, timeout), timeout + 5)[0]

    def close(self) -> None:
        try:
            self.call(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            logging.getLogger().removeHandler(self.errors)
