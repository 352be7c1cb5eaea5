"""Running the app as a replica: SIGTERM drains, then the process exits 0.

The drain, in order: /ready turns 503 (a load balancer or Kubernetes stops sending new clients),
new WebSocket handshakes get HTTP 503 with Retry-After (nginx's ``proxy_next_upstream http_503``
retries them on another replica), a session opened just before the drain gets TTS_UNAVAILABLE
and close 1013 when it sends ``start``. While utterances are still running, idle sessions are
closed with 1001 (after a short grace for messages already on the wire) and busy ones as soon as
their queue is spoken, so their clients move to another replica instead of racing the exit. When
nothing is in flight, or at ``drain_timeout_s``, the process shuts down: sockets still open get
1001, and it exits 0. A second SIGTERM skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import WSCloseCode, web

from server.state import STATE, AppState, in_flight

log = logging.getLogger("makima.server")
POLL_S = 0.05
IDLE_GRACE_S = 1.0  # a speak sent just before SIGTERM is still on the wire; let it arrive


def close_idle_sessions(state: AppState) -> int:
    """Close (1001) every session with nothing queued or being spoken; returns how many. The closes
    run in the background: each waits for its client's reply, and the drain must not."""
    n = 0
    for session in list(state.sessions):
        if not session.busy and not session.closing:
            session.closing = True  # its reader stops after this; no new worker starts
            state.spawn(session.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server draining"))
            n += 1
    return n


async def drain(app: web.Application) -> bool:
    """Stop taking new work and wait for running utterances, up to ``drain_timeout_s``; True when
    everything finished in time."""
    state = app[STATE]
    state.draining = True
    state.metrics.ready.set(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    deadline = t0 + state.settings.drain_timeout_s
    log.info("draining: waiting up to %.0f s for %d utterance(s) and request(s) in flight",
             state.settings.drain_timeout_s, in_flight(state))
    while True:
        left = in_flight(state)
        if left == 0 or loop.time() >= deadline:
            break
        if loop.time() - t0 >= IDLE_GRACE_S:
            close_idle_sessions(state)
        await asyncio.sleep(POLL_S)
    if left:
        log.warning("drain deadline: %d utterance(s) and request(s) still running are cut off", left)
    else:
        log.info("drained")
    return left == 0


def exit_after_drain_on_sigterm(app: web.Application) -> None:
    """Replace run_app's SIGTERM handler (installed before on_startup) with drain-then-exit."""
    loop = asyncio.get_running_loop()
    exiting = False
    drains: set[asyncio.Task] = set()  # a reference, so the task is not collected mid-drain

    def _raise_exit() -> None:
        nonlocal exiting
        if exiting:  # already shutting down: a second GracefulExit (code 1) would escape run_app
            return
        exiting = True
        raise web.GracefulExit()  # a SystemExit: it leaves run_forever, and run_app shuts down

    async def _drain_then_exit() -> None:
        await drain(app)
        loop.call_soon(_raise_exit)

    def on_sigterm() -> None:
        if app[STATE].draining:  # a second SIGTERM: stop waiting
            _raise_exit()
            return
        task = asyncio.ensure_future(_drain_then_exit())
        drains.add(task)
        task.add_done_callback(drains.discard)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)


def run(app: web.Application, host: str, port: int, print_: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM (drain, then return) or SIGINT (return at once). The process exits 0 after."""

    async def on_startup(app: web.Application) -> None:
        exit_after_drain_on_sigterm(app)

    app.on_startup.append(on_startup)
    # shutdown_timeout: after the drain, how long handlers get once their sockets are closed.
    web.run_app(app, host=host, port=port, shutdown_timeout=10, access_log=None,
                print=print_ or (lambda msg: log.info("%s", msg.strip())))
