"""Build the real engine for ``makima-tts serve``, off the event loop, reporting progress.

The only place the server names ``engine.engine``: everything else gets a ``TTSEngine``.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

from engine.api import TTSEngine

log = logging.getLogger("makima.server.loader")
RANDOM_PREFIX = "random:"


def is_random(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


def load_engine(model: str, device: str, progress: Callable[[str], None], cpu_threads: int = 1,
                weights: str = "auto", dtype: str | None = None) -> TTSEngine:
    """``model``: a checkpoint directory, a hub id, or ``random:PRESET`` (a random checkpoint in the
    real layout, written to a temporary directory: it serves noise, for trying the stack)."""
    try:
        from engine.config import EngineConfig
        from engine.engine import Engine
    except ImportError as e:
        raise RuntimeError(f"the serving engine is not available in this build ({e})") from e
    path: str = model
    if is_random(model):
        from engine.random_checkpoint import make_random_checkpoint

        preset = model[len(RANDOM_PREFIX):]
        progress(f"writing a random {preset} checkpoint")
        tmp = tempfile.mkdtemp(prefix=f"makima-random-{preset}-")
        atexit.register(shutil.rmtree, tmp, True)  # the engine reads it while it runs; gone at exit
        path = str(make_random_checkpoint(tmp, preset, seed=0))
        log.warning("serving a RANDOM %s checkpoint from %s: its audio is noise", preset, path)
    progress(f"loading {path} on {device}")
    done = threading.Event()
    t0 = time.monotonic()

    def ticker() -> None:  # a hub download or a big checkpoint can take minutes: keep saying so
        while not done.wait(5.0):
            progress(f"loading {path} on {device} ({time.monotonic() - t0:.0f} s)")

    threading.Thread(target=ticker, daemon=True).start()
    try:
        engine = Engine.from_model(path, EngineConfig(device=device, cpu_threads=cpu_threads, weights=weights,
                                                      dtype=dtype))
    finally:
        done.set()
    log.info("model loaded in %.1f s", time.monotonic() - t0)
    return engine
