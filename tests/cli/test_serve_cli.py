"""``makima-tts serve`` as a process: a model that cannot load makes it exit 1 with one clear message
(after retrying transient download errors), and listening beyond loopback without auth is warned about."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import _is_loopback
from server.loader import fetch_with_retry, is_transient

ROOT = Path(__file__).resolve().parents[2]
WARNING = "without --auth-token-file"


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    # --port 0: the OS picks a free one; these servers never get as far as taking a request.
    return subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--device", "cpu", "--port", "0",
                             "--voices-dir", str(tmp_path / "voices"), *args],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out


@pytest.fixture(scope="module")
def failed_servers(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """Servers whose model cannot load (or whose --threads is bad), started at once (each pays torch's import), as
    name -> (exit code, output). They exit right after start-up, so the bind warning is already out."""
    tmp = tmp_path_factory.mktemp("serve")
    tokens = tmp / "tokens"
    tokens.write_text("s3cret\n")
    missing = str(tmp / "no-such-checkpoint")
    procs = {"open": serve(tmp, "--host", "0.0.0.0", "--model", missing),
             "authed": serve(tmp, "--host", "0.0.0.0", "--auth-token-file", str(tokens), "--model", missing),
             "local": serve(tmp, "--host", "127.0.0.1", "--model", "no-such-org/no-such-model"),  # offline
             "threads": serve(tmp, "--threads", "0", "--model", missing)}
    return {name: finish(proc) for name, proc in procs.items()}


def test_a_model_that_cannot_load_exits_1_with_one_message_naming_the_ways_out(failed_servers):
    for name, named in (("open", "no-such-checkpoint"), ("local", "no-such-org/no-such-model")):
        code, out = failed_servers[name]
        assert code == 1, out
        assert "Traceback" not in out
        assert "--model PATH" in out and "--model random:tiny" in out and named in out
        assert "retrying" not in out  # a missing directory and offline mode are not worth waiting for


def test_listening_beyond_loopback_without_auth_is_warned_about(failed_servers):
    warned = {name: WARNING in out for name, (_, out) in failed_servers.items()}
    assert warned == {"open": True, "authed": False, "local": False, "threads": False}


def test_serve_threads_is_checked_at_once(failed_servers):
    code, out = failed_servers["threads"]
    assert code == 2 and out == "makima-tts serve: error: --threads must be >= 1\n"


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True),
                                            ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                            ("10.0.0.5", False), ("tts.example.com", False)])
def test_loopback_hosts(host, loopback):
    assert _is_loopback(host) == loopback


class FakeHTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.response = type("Response", (), {"status_code": status})()


class OfflineModeIsEnabled(ConnectionError):
    """huggingface_hub's own: a ConnectionError that HF_HUB_OFFLINE=1 raises on purpose."""


def chained(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("error, transient", [
    (chained(RuntimeError("could not fetch"), chained(FileNotFoundError("no cache"), OSError("dns"))), False),
    (chained(RuntimeError("could not fetch"), chained(FileNotFoundError("no cache"), ConnectionResetError())), True),
    (chained(RuntimeError("could not fetch"), TimeoutError()), True),
    (chained(RuntimeError("could not fetch"), FakeHTTPError(503)), True),
    (chained(RuntimeError("could not fetch"), FakeHTTPError(429)), True),
    (chained(RuntimeError("could not fetch"), FakeHTTPError(404)), False),
    (chained(RuntimeError("could not fetch"), OfflineModeIsEnabled("offline")), False),
    (RuntimeError("not a checkpoint directory"), False),
])
def test_transient_means_network_or_hub_overload(error, transient):
    assert is_transient(error) == transient


def test_transient_errors_are_retried_with_doubling_backoff_then_raised():
    sleeps, said = [], []
    calls = iter([ConnectionResetError(), TimeoutError(), Path("/ckpt")])

    def fetch() -> Path:
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    assert fetch_with_retry(fetch, said.append, attempts=4, backoff_s=2, sleep=sleeps.append) == Path("/ckpt")
    assert sleeps == [2, 4] and "attempt 3 of 4" in said[-1]

    def always_down() -> Path:
        raise ConnectionResetError("down")

    sleeps.clear()
    with pytest.raises(ConnectionResetError):
        fetch_with_retry(always_down, said.append, attempts=3, backoff_s=1, sleep=sleeps.append)
    assert sleeps == [1, 2]

    def not_found() -> Path:
        raise FileNotFoundError("no such checkpoint")

    sleeps.clear()
    with pytest.raises(FileNotFoundError):
        fetch_with_retry(not_found, said.append, sleep=sleeps.append)
    assert sleeps == []
