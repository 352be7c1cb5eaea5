"""Run Debian's nginx with deploy/nginx/makima-tts.conf in front of test replicas.

The shipped file is used as it is, except for three substitutions: the replica lines of the
upstream, the listen line (a loopback port), and one test-only header naming the replica that
answered (production should not reveal its upstream addresses).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp

from tests.reliability.procs import ROOT, free_port, wait_http_ok

CONF = ROOT / "deploy" / "nginx" / "makima-tts.conf"


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None  # not on a user's PATH


def render(upstreams: list[str], port: int) -> str:
    """The shipped config with the test's replicas and port."""
    text = CONF.read_text()
    servers = "\n".join(f"    server {a} max_fails=1 fail_timeout=5s;" for a in upstreams)
    text, n = re.subn(r"(?m)^(    server \S+ max_fails.*\n)+", servers + "\n", text)
    assert n == 1, "the upstream's server lines were not found"
    text, n = re.subn(r"(?m)^    listen 80;$", f"    listen 127.0.0.1:{port};", text)
    assert n == 1, "the listen line was not found"
    text, n = re.subn(r"(?m)^(        proxy_pass http://makima_tts;)$",
                      r"\1\n        add_header X-Makima-Upstream $upstream_addr always;", text)
    assert n == 1, "proxy_pass was not found"
    return text


def main_conf(tmp: Path, site: Path) -> str:
    # Everything nginx writes stays in tmp; two workers, as in production, so the upstream zone matters.
    temps = "\n".join(f"  {k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"worker_processes 2;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log info;\n"
            f"events {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log {tmp}/access.log;\n{temps}\n  include {site};\n}}\n")


class Nginx:
    def __init__(self, binary: str, tmp: Path, upstreams: list[str]) -> None:
        self.tmp = tmp
        self.port = free_port()
        site = tmp / "makima-tts.conf"
        site.write_text(render(upstreams, self.port))
        conf = tmp / "nginx.conf"
        conf.write_text(main_conf(tmp, site))
        check = subprocess.run([binary, "-t", "-p", str(tmp), "-c", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, f"nginx -t failed:\n{check.stderr}"
        self.proc = subprocess.Popen([binary, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_up(self, http: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        await wait_http_ok(http, self.url + "/health", timeout,
                           lambda: None if self.proc.poll() is None else f"nginx exited:\n{self.error_log()[-2000:]}",
                           lambda: "nginx did not come up")

    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
