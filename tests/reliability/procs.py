"""Server processes for the suite: ``makima-tts serve --model random:tiny`` or the fake-engine
replica, on loopback ports, logging to a file, always killed on the way out."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    def __init__(self, args: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> None:
        self.port, self.log_path = port, log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.sigterm_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024

    def sigterm(self) -> None:
        self.sigterm_at = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


def real_replica(tmp: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> Replica:
    port = free_port()
    args = ["-m", "server.cli", "serve", "--model", "random:tiny", "--device", "cpu", "--port", str(port),
            "--voices-dir", str(tmp / f"voices-{name}"), *extra]
    return Replica(args, port, tmp / f"{name}.log", env)


def fake_replica(tmp: Path, name: str, *extra: str) -> Replica:
    port = free_port()
    return Replica(["-m", "tests.reliability.fake_replica", "--port", str(port), *extra], port, tmp / f"{name}.log")


async def wait_http_ok(http: aiohttp.ClientSession, url: str, timeout: float, exited: Callable[[], str | None],
                       not_up: Callable[[], str]) -> None:
    """Poll ``url`` every 0.1 s until it answers 200. Fails with ``exited()`` as soon as that says the
    process died, and with ``not_up()`` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        died = exited()
        if died is not None:
            raise AssertionError(died)
        try:
            async with http.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(not_up())


async def wait_ready(http: aiohttp.ClientSession, replica: Replica, timeout: float = 120.0) -> None:
    def exited() -> str | None:
        if replica.proc.poll() is None:
            return None
        return f"replica exited with {replica.proc.returncode}:\n{replica.output()[-3000:]}"

    await wait_http_ok(http, replica.url + "/ready", timeout, exited,
                       lambda: f"replica not ready after {timeout:g} s:\n{replica.output()[-3000:]}")


async def metrics(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """Prometheus text → {name{labels}: value} (one replica's /metrics)."""
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def wait_engine_idle(http: aiohttp.ClientSession, base: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no session is open; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = await metrics(http, base)
        idle = (m.get("makima_tts:num_requests_running", 0) == 0 and m.get("makima_tts:num_requests_waiting", 0) == 0
                and m.get("makima_tts:kv_blocks_used", 0) == 0 and m.get("makima_tts:num_sessions", 0) == 0)
        if idle or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.1)
