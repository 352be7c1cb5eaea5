"""A tiny server that speaks the /api/v1/speak protocol on a known schedule, to check the load
generator against: its first chunk goes out ``first_ms`` after ``speak`` arrives, the rest at fixed
offsets after that, and it logs the moment each chunk actually left (same process, same clock), so
a test can compare what the generator measured with what was sent. Runs in its own thread and event
loop, so the client's work cannot delay the server's schedule."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web

SAMPLES_PER_FRAME = 1920  # 80 ms at 24 kHz


@dataclass
class Script:
    first_ms: float = 150.0  # speak received → first chunk sent: the injected TTFA
    # (ms after the first chunk, frames): 80 ms of audio, then 160 ms 10 ms later (on time by 70 ms),
    # then 320 ms at 340 ms (the audio so far ran out at 240 ms: one underrun, 100 ms of stall), then
    # 320 ms at 440 ms (due at 660 ms: on time). Margins this wide survive a busy machine's scheduling.
    chunks: tuple[tuple[float, int], ...] = ((0, 1), (10, 2), (340, 4), (440, 4))
    complete_ms: float = 450.0  # after the first chunk

    @property
    def frames(self) -> int:
        return sum(n for _, n in self.chunks)


@dataclass
class Sent:
    received: float  # perf_counter when speak arrived
    chunks: list[float] = field(default_factory=list)  # perf_counter just before each chunk was written
    completed: float | None = None


@dataclass
class ScriptedServer:
    script: Script = field(default_factory=Script)
    info: dict = field(default_factory=lambda: {"model": "scripted", "noise": False, "default_voice": None})
    max_sessions: int = 1000
    log: list[Sent] = field(default_factory=list)
    starts: list[dict] = field(default_factory=list)  # every start message received
    sessions: int = 0
    port: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        async def ready(request: web.Request) -> web.Response:
            return web.json_response({"ready": True})

        async def info(request: web.Request) -> web.Response:
            return web.json_response(self.info)

        app.router.add_get("/ready", ready)
        app.router.add_get("/api/v1/info", info)
        app.router.add_get("/api/v1/speak", self._speak)
        return app

    async def _speak(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sessions += 1
        try:
            if self.sessions > self.max_sessions:
                await ws.send_json({"type": "error", "code": "OVERLOADED", "message": "too many sessions"})
                await ws.close(code=1013)
                return ws
            async for msg in ws:
                m = json.loads(msg.data)
                if m["type"] == "start":
                    self.starts.append(m)
                    await ws.send_json({"type": "ready", "session_id": "s", "sample_rate": 24000,
                                        "encoding": m.get("encoding", "pcm_s16le"), "channels": 1, "voice": None,
                                        "language": m.get("language", "auto")})
                elif m["type"] == "speak":
                    await self._utterance(ws, m)
        finally:
            self.sessions -= 1
        return ws

    async def _utterance(self, ws: web.WebSocketResponse, m: dict) -> None:
        sent = Sent(time.perf_counter())
        if "FAIL" in m["text"]:
            await ws.send_json({"type": "error", "code": "SYNTHESIS_ERROR", "message": "injected", "id": m["id"]})
            return
        loop = asyncio.get_running_loop()
        base = loop.time() + self.script.first_ms / 1000  # absolute deadlines: no drift from sleep overshoot
        for offset_ms, frames in self.script.chunks:
            await asyncio.sleep(max(0.0, base + offset_ms / 1000 - loop.time()))
            # Stamped just before the write: the client cannot read the frame any earlier than this.
            sent.chunks.append(time.perf_counter())
            await ws.send_bytes(bytes(2 * SAMPLES_PER_FRAME * frames))
            if "HANG" in m["text"]:
                return  # never completes: the client must time out
        await asyncio.sleep(max(0.0, base + self.script.complete_ms / 1000 - loop.time()))
        sent.completed = time.perf_counter()
        await ws.send_json({"type": "complete", "id": m["id"], "frames": self.script.frames,
                            "audio_ms": 80.0 * self.script.frames, "ttfa_ms": self.script.first_ms,
                            "stop_reason": "eos"})
        self.log.append(sent)


@contextlib.contextmanager
def running(app: web.Application) -> Iterator[int]:
    """Serve ``app`` on a loopback port in a thread with its own event loop; yields the port."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    port: list[int] = []
    errors: list[BaseException] = []

    async def serve() -> None:
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port.append(runner.addresses[0][1])
            started.set()
            await stop.wait()
        finally:
            await runner.cleanup()

    def main() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as e:  # surfaced to the test instead of hanging it
            errors.append(e)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    if not started.wait(10) or errors:
        raise RuntimeError(f"server did not start: {errors}")
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


@contextlib.contextmanager
def scripted(server: ScriptedServer | None = None) -> Iterator[ScriptedServer]:
    server = server or ScriptedServer()
    with running(server.app()) as port:
        server.port = port
        yield server
