"""``deploy/`` files parse and pass each tool's own checker where the tool exists.

Always: the compose file is valid YAML with the expected services, the nginx site exposes
``/v1/fleet/`` and refuses other ``/v1/`` paths, Dockerfiles run as a non-root user, systemd
units restart always. When installed: ``nginx -t`` (with test certificates), ``systemd-analyze
verify``, ``docker compose config`` and ``docker build`` (needs a Docker daemon).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from coordinator.security import make_tls
from tests.test_deploy_proxy import NGINX, render_nginx

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _docker_daemon() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0


def test_compose_file_services_and_healthchecks() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"proxy", "superlink", "coordinator", "postgres"}
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no health check"
    # Published: the proxy (443) and the TLS blob service; the SuperLink stays internal.
    published = {n: s["ports"] for n, s in services.items() if s.get("ports")}
    assert published == {"proxy": ["443:443"], "coordinator": ["9094:9094"]}
    assert services["superlink"]["networks"] == ["internal"]
    assert doc["networks"]["internal"]["internal"] is True
    superlink = services["superlink"]["command"]
    for flag in ("--superexec-auth-secret-file", "--enable-supernode-auth", "--ssl-certfile"):
        assert flag in superlink, flag
    assert "--insecure" not in superlink
    serve = services["coordinator"]["command"]
    assert "--secrets-dir" in serve and "--insecure" not in serve
    assert "PERSPECTIVE_DB" in services["coordinator"]["environment"]


def test_nginx_site_exposes_only_fleet_api() -> None:
    site = (DEPLOY / "nginx" / "perspective.conf").read_text()
    proxied = re.findall(r"location\s+\^~\s+(\S+)\s*\{\s*proxy_pass\s+https://(\w+)", site)
    assert ("/v1/fleet/", "perspective_superlink") in proxied
    assert [p for p, upstream in proxied if upstream == "perspective_superlink"] == ["/v1/fleet/"]
    assert re.search(r"location\s+\^~\s+/v1/\s*\{\s*return 404;", site)
    assert "proxy_ssl_verify on;" in site  # upstreams are verified against the network CA


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx-light)")
def test_nginx_config_passes_nginx_t(tmp_path) -> None:
    tls = make_tls(tmp_path / "tls", ["localhost"])
    conf = render_nginx(tmp_path, 8443, "127.0.0.1:9091", "127.0.0.1:8080", tls)
    out = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", ["coordinator", "participant"])
def test_dockerfiles_non_root(name: str) -> None:
    text = (DEPLOY / f"{name}.Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in text


@pytest.mark.parametrize("role", ["coordinator", "superlink", "participant"])
def test_systemd_units(role: str, tmp_path) -> None:
    path = DEPLOY / "systemd" / f"perspective-{role}.service"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(path)
    assert unit["Service"]["Restart"] == "always"
    assert unit["Service"]["User"] != "root"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # The installed binaries cannot exist on a test machine: verify copies of all units
    # whose ExecStart points at /usr/bin/true, and then nothing may be wrong at all.
    for other in (DEPLOY / "systemd").glob("*.service"):
        text = re.sub(r"/opt/perspective/venv/bin/[\w-]+", "/usr/bin/true", other.read_text())
        (tmp_path / other.name).write_text(text)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / path.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Tolerated only: RestartSteps/RestartMaxDelaySec are unknown before systemd 254
    # (ignored there, honoured on newer systems).
    problems = [
        line for line in (out.stderr + out.stdout).splitlines()
        if line.strip() and "RestartSteps" not in line and "RestartMaxDelaySec" not in line
    ]  # fmt: skip
    assert out.returncode == 0 and problems == [], out.stderr + out.stdout


def test_docker_compose_config() -> None:
    if not _docker_daemon() and shutil.which("docker") is None:
        pytest.skip("docker not installed")
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20)
    if probe.returncode != 0:
        pytest.skip("docker compose plugin not installed")
    secrets = DEPLOY / "secrets"
    created = not secrets.exists()
    try:
        (secrets / "tls").mkdir(parents=True, exist_ok=True)
        (secrets / "superexec.secret").touch()
        out = subprocess.run(
            ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PERSPECTIVE_PUBLIC_HOST": "fleet.example.org"},
        )  # fmt: skip
    finally:
        if created:
            shutil.rmtree(secrets)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coordinator", "participant"])
def test_docker_build(name: str) -> None:
    if not _docker_daemon():
        pytest.skip("no Docker daemon available (docker info failed)")
    out = subprocess.run(
        ["docker", "build", "-f", str(DEPLOY / f"{name}.Dockerfile"), "-t",
         f"perspective-{name}:test", str(ROOT)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
