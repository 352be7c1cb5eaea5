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
from pathlib import Path

from engine.api import TTSEngine

log = logging.getLogger("makima.server.loader")
RANDOM_PREFIX = "random:"
# A hub download that fails on the network (a DNS blip, a reset, a 5xx or 429 from the hub) is tried
# again after 2, 4 and 8 s; an unknown repo, a missing directory or offline mode fails at once.
FETCH_ATTEMPTS = 4
FETCH_BACKOFF_S = 2.0
_TRANSIENT_NAMES = ("Timeout", "TransportError", "NetworkError", "ConnectionError", "ConnectError", "gaierror")
_PERMANENT_NAMES = ("OfflineModeIsEnabled",)  # a ConnectionError to Python, but set on purpose


def is_transient(error: BaseException) -> bool:
    """True when ``error`` (or anything in its cause chain) is a network failure or an HTTP 429/5xx:
    worth retrying. By class name, so neither httpx nor requests needs importing here."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = [k.__name__ for k in type(e).__mro__]
        if any(n in _PERMANENT_NAMES for n in names):
            return False
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 429 or (isinstance(status, int) and status >= 500):
            return True
        if isinstance(e, TimeoutError | ConnectionError) or any(n.endswith(_TRANSIENT_NAMES) for n in names):
            return True
        e = e.__cause__ or e.__context__
    return False


def fetch_with_retry(fetch: Callable[[], Path], progress: Callable[[str], None],
                     attempts: int = FETCH_ATTEMPTS, backoff_s: float = FETCH_BACKOFF_S,
                     sleep: Callable[[float], None] = time.sleep) -> Path:
    """``fetch()``, again after ``backoff_s``, 2x, 4x ... while it fails transiently; the last error
    (or the first permanent one) is raised."""
    attempt = 1
    while True:
        try:
            return fetch()
        except Exception as e:
            if attempt >= attempts or not is_transient(e):
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            attempt += 1
            progress(f"fetching the model failed ({type(e).__name__}); retrying in {delay:g} s "
                     f"(attempt {attempt} of {attempts})")
            sleep(delay)


def is_random(model: str) -> bool:
    return model.startswith(RANDOM_PREFIX)


def checkpoint_dir(model: str, progress: Callable[[str], None]) -> str:
    """``model`` as a local checkpoint directory: itself, a hub id fetched (with retries), or for
    ``random:PRESET`` a random checkpoint in the real layout written to a temporary directory
    (it serves noise, for trying the stack; removed at exit)."""
    from engine.checkpoint import resolve_model

    if not is_random(model):
        if not Path(model).expanduser().is_dir():  # a hub id: a download may follow
            progress(f"finding {model}")
        return str(fetch_with_retry(lambda: resolve_model(model), progress))
    from engine.random_checkpoint import make_random_checkpoint

    preset = model[len(RANDOM_PREFIX):]
    progress(f"writing a random {preset} checkpoint")
    tmp = tempfile.mkdtemp(prefix=f"makima-random-{preset}-")
    atexit.register(shutil.rmtree, tmp, True)  # the engine reads it while it runs; gone at exit
    path = str(make_random_checkpoint(Path(tmp) / "checkpoint", preset, seed=0))
    log.warning("serving a RANDOM %s checkpoint from %s: its audio is noise", preset, path)
    return path


def load_engine(model: str, device: str, progress: Callable[[str], None], cpu_threads: int = 1,
                weights: str = "auto", dtype: str | None = None) -> TTSEngine:
    """``model``: a checkpoint directory, a hub id, or ``random:PRESET`` (see ``checkpoint_dir``)."""
    try:
        from engine.config import EngineConfig
        from engine.engine import Engine
    except ImportError as e:
        raise RuntimeError(f"the serving engine is not available in this build ({e})") from e
    path = checkpoint_dir(model, progress)
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
