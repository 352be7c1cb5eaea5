"""Static checks of deploy/: the numbers in the four deployment files agree with each other and
with the server (drain timeout, heartbeat, probe paths), and nginx accepts its config."""

from __future__ import annotations

import re
import subprocess

import pytest

from server.settings import ServerSettings
from tests.reliability.nginx import main_conf, nginx_binary, render
from tests.reliability.procs import ROOT

DEPLOY = ROOT / "deploy"
DRAIN_S = ServerSettings().drain_timeout_s
SHUTDOWN_S = 10  # server.lifecycle.run: handlers get this long after the drain


def test_kubernetes_probes_grace_and_gpu() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the manifests")
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in container["env"]}
    drain = float(env["MAKIMA_DRAIN_TIMEOUT"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + SHUTDOWN_S
    ingress = next(d for d in docs if d["kind"] == "Ingress")["metadata"]["annotations"]
    assert "http_503" in ingress["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    assert int(ingress["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > ServerSettings().heartbeat_s


def test_systemd_stop_timeout_outlasts_the_drain() -> None:
    unit = (DEPLOY / "systemd" / "makima-tts@.service").read_text()
    drain = float(re.search(r"MAKIMA_DRAIN_TIMEOUT=(\d+)", unit).group(1))
    assert int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.MULTILINE).group(1)) > drain + SHUTDOWN_S
    assert "KillSignal=SIGTERM" in unit and "KillMode=mixed" in unit


def test_dockerfile_runs_the_server_as_pid_1_on_a_cuda_base() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.MULTILINE)
    assert 'ENTRYPOINT ["makima-tts", "serve"]' in text  # exec form: SIGTERM reaches the server itself
    assert "MAKIMA_DRAIN_TIMEOUT=30" in text and "USER makima" in text


def test_nginx_config_has_what_the_replicas_need() -> None:
    text = (DEPLOY / "nginx" / "makima-tts.conf").read_text()
    for directive in ("least_conn;", "zone makima_tts", "proxy_http_version 1.1;", "proxy_set_header Upgrade",
                      "proxy_set_header X-Forwarded-For $remote_addr;", "proxy_next_upstream error timeout http_503;",
                      "proxy_buffering off;"):
        assert directive in text, directive
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1))
    assert read_timeout > ServerSettings().heartbeat_s


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (Debian: apt-get install -y nginx)")
def test_nginx_accepts_the_config(tmp_path) -> None:
    site = tmp_path / "makima-tts.conf"
    site.write_text(render(["127.0.0.1:8001", "127.0.0.1:8002"], 8080))
    (tmp_path / "nginx.conf").write_text(main_conf(tmp_path, site))
    check = subprocess.run([nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
