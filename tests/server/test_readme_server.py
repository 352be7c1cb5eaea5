"""The OpenAI Python SDK against the README's serve command (plus ``--model random:tiny``): a client
that knows nothing about this server synthesises with ``voice="alloy"`` out of the box."""

from __future__ import annotations

import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]


def readme_serve_args() -> list[str]:
    """The arguments of the README's ``makima-tts serve`` command, so this test follows the README."""
    match = re.search(r"makima-tts serve([^\n`]*)", (ROOT / "README.md").read_text())
    assert match, "the README has no makima-tts serve command"
    return shlex.split(match.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready after {timeout} s")


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    """The README's serve command plus --model random:tiny, at a free port; yields (base URL, process)."""
    args = readme_serve_args()
    assert "--port" in args
    port = free_port()
    args[args.index("--port") + 1] = str(port)  # the README's 8000 may be taken here
    # `makima-tts` is server.cli:main; run the module so the test exercises this tree, not an install.
    env = {**os.environ, "MAKIMA_VOICES_DIR": str(tmp_path_factory.mktemp("voices"))}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", *args, "--model", "random:tiny",
                             "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_openai_sdk_synthesises_with_alloy_from_the_readme_server(readme_server):
    base, _ = readme_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    for fmt in ("wav", "mp3"):
        speech = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the SDK.",
                                            response_format=fmt)
        audio, sr = sf.read(io.BytesIO(speech.read()))
        assert sr == 24000 and len(audio) > 0, fmt


def test_metrics_look_like_what_they_are_and_each_utterance_logs_one_line(readme_server):
    base, proc = readme_server
    body = b'{"model": "tts-1", "input": "Log me.", "voice": "nova", "response_format": "pcm"}'
    req = urllib.request.Request(base + "/v1/audio/speech", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert len(r.read()) > 0
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "# TYPE makima_tts:kv_blocks_capacity gauge" in text and "kv_blocks_total" not in text
    assert "_created" not in text
    assert re.search(r"^process_resident_memory_bytes [0-9.e+]+$", text, re.MULTILINE)
    proc.terminate()  # the log is read to its end: the server drains and exits 0
    out, _ = proc.communicate(timeout=60)
    lines = [ln for ln in out.splitlines() if "makima.server.utterance" in ln]
    assert len(lines) >= 1, out[-3000:]
    last = lines[-1]
    for field in ("id=http-", "voice=_builtin", "outcome=ok", "frames=", "ttfa_ms=", "rtf=", "stop="):
        assert field in last, last
