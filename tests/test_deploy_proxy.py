"""The real nginx proxy from ``deploy/nginx/perspective.conf`` in front of a real SuperLink.

nginx terminates TLS (certificates from :func:`coordinator.security.make_tls`), re-encrypts
to the TLS SuperLink (verified against the network CA) and forwards only ``/v1/fleet/*``:
Flower's Control API (start runs, register nodes) and Runtime API must be unreachable
through it, while a SuperNode connecting via the proxy address still exchanges messages
with the coordinator (which talks to the SuperLink on loopback).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from coordinator.flower.run import open_driver
from coordinator.flower.superlink import SuperLinkProcess, TLSFiles
from coordinator.security import make_tls
from participant.flower.supernode import SuperNodeProcess
from participant.flower.worker import FlowerWorker
from shared_model.processes import ManagedProcess, free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx-light)"),
]
CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "perspective.conf"


def render_nginx(work: Path, listen: int, superlink: str, api: str, tls) -> Path:
    """A standalone nginx.conf (non-root paths) that includes our site config, retargeted."""
    site = CONF.read_text()
    site = site.replace("superlink:9091", superlink).replace("coordinator:8080", api)
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;")
    site = site.replace("/etc/perspective/tls/server.crt", str(tls.cert))
    site = site.replace("/etc/perspective/tls/server.key", str(tls.key))
    site = site.replace("/etc/perspective/tls/ca.crt", str(tls.ca_cert))
    (work / "perspective.conf").write_text(site)
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / "tmp" / d).mkdir(parents=True, exist_ok=True)
    main = f"""
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    include {work}/perspective.conf;
}}
"""
    path = work / "nginx.conf"
    path.write_text(main)
    return path


def test_only_fleet_api_is_exposed_and_a_node_trains_through_the_proxy(tmp_path) -> None:
    tls = make_tls(tmp_path / "tls", ["127.0.0.1", "localhost"])
    superlink = SuperLinkProcess(  # TLS on loopback, as deployed
        tmp_path / "superlink", tls=TLSFiles(tls.ca_cert, tls.cert, tls.key)
    )
    api_port, proxy_port = free_port(), free_port()
    conf = render_nginx(tmp_path, proxy_port, superlink.address, f"127.0.0.1:{api_port}", tls)
    check = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proxy = ManagedProcess("nginx", [NGINX, "-c", str(conf)], {}, tmp_path / "nginx.out", None)
    node = worker = driver = None
    try:
        superlink.start()
        proxy.start()
        superlink.wait_until_ready(90)
        public = f"https://127.0.0.1:{proxy_port}"
        ca = str(tls.ca_cert)
        # Control and Runtime APIs answer on the SuperLink itself ...
        direct = httpx.post(
            f"https://{superlink.address}/v1/control/list-runs", content=b"", verify=ca
        )
        assert direct.status_code != 404
        # ... but not through the proxy: no run can be started, no node registered.
        for path in ("/v1/control/start-run", "/v1/control/register-node",
                     "/v1/control/list-runs", "/v1/runtime/acquire-task", "/v1//control/start-run",
                     "/v1/fleet/../control/start-run", "/v1/%63ontrol/start-run"):  # fmt: skip
            resp = httpx.post(public + path, content=b"x", verify=ca)
            assert resp.status_code in (400, 403, 404), (path, resp.status_code)
        node = SuperNodeProcess(
            tmp_path / "node", f"127.0.0.1:{proxy_port}", root_certificates=tls.ca_cert
        )
        node.start()
        node.wait_until_ready(60)
        worker = FlowerWorker(
            node.runtime_address,
            lambda kind, payload: b"trained:" + payload,
            poll_interval=0.05,
            superexec_secret=node.superexec_secret,
        )
        worker.start()
        worker.wait_until_ready(30)
        driver = open_driver(
            superlink.address,
            superexec_secret=superlink.superexec_secret,
            insecure=False,
            root_certificates=superlink.root_certificates,
        )
        deadline = time.monotonic() + 60
        while not driver.node_ids():
            assert time.monotonic() < deadline, "SuperNode did not register through the proxy"
            time.sleep(0.2)
        driver.push(driver.node_ids()[0], b"unit-1", "train.unit", ttl=60)
        replies = []
        while not replies and time.monotonic() < deadline:
            replies = driver.wait_any(deadline - time.monotonic())
        assert replies and replies[0].ok and replies[0].payload == b"trained:unit-1"
        log = (tmp_path / "access.log").read_text()
        assert "/v1/fleet/" in log  # the node really went through nginx
    finally:
        if driver is not None:
            driver.close()
        if worker is not None:
            worker.shutdown(5)
        if node is not None:
            node.shutdown(10)
        proxy.shutdown(5)
        superlink.shutdown(10)
