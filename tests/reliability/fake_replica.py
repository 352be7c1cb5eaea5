"""A replica around the fake engine, for tests: ``python -m tests.reliability.fake_replica --port P``.

It runs the production app and lifecycle (``server.lifecycle.run``: SIGTERM drains, then exit 0)
with ``tests/server/fake_engine.FakeEngine`` in place of the model, so proxy and drain tests start
in a second and pace their streams exactly (``--chunk-delay`` seconds per chunk).
"""

from __future__ import annotations

import argparse
import logging

from server.app import create_app
from server.lifecycle import run
from server.settings import ServerSettings
from tests.server.fake_engine import FakeEngine


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunk-delay", type=float, default=0.02)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--max-sessions", type=int, default=256)
    args = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(model_name="fake", max_sessions=args.max_sessions, drain_timeout_s=args.drain_timeout)
    run(create_app(FakeEngine(chunk_delay=args.chunk_delay), settings), "127.0.0.1", args.port)


if __name__ == "__main__":
    main()
