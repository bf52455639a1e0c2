"""The secure coordinator stack end to end, as deployed, on 127.0.0.1 — every piece real.

* ``perspective coordinator init`` writes the CA, server certificate, SuperExec secret,
  blob-token key and the first operator token;
* ``flower-superlink`` with TLS, ``--enable-supernode-auth``, the SuperExec secret and a
  database, on loopback;
* Debian's nginx with ``deploy/nginx/perspective.conf`` in front (TLS, re-encrypting to
  the SuperLink and the REST API, only ``/v1/fleet/*`` and the API exposed);
* ``perspective coordinator serve --secrets-dir --db``: TLS blob service and REST API,
  node-key sync, the federation loop, on a throw-away PostgreSQL server as in
  ``deploy/compose.yaml`` (SQLite where no PostgreSQL can start; the test says so);
* a volunteer: ``perspective participant join`` through the proxy with the operator's
  enrolment token, then ``perspective participant run`` (daemon → SuperNode with its node
  key + worker with the CA for the blob service).

One test walks the volunteer's life: enrolled → trains (results accepted) while Flower's
Control API stays unreachable through the proxy → the whole coordinator host (SuperLink
and ``serve``) is killed for longer than the participant's first retry delay and brought
back → the participant resumes by itself and its next result is accepted → revoked by
the operator → its key is unregistered (event log says why), its node is refused, its
daemon's signed report of the refusal reaches the coordinator through the proxy and is
refused (a revoked node's reports are not logged), and that answer (revoked) stops the
daemon for good (exit code 3).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy

from coordinator.flower.superlink import SuperLinkProcess, TLSFiles
from participant.progress import read_progress
from shared_model.processes import ManagedProcess, free_port
from tests.conftest import wait_for
from tests.operator_guide import run_guide_block
from tests.postgres_server import PostgresUnavailable, postgres_server
from tests.test_deploy_proxy import NGINX, render_nginx

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx-light)"),
]
CLI = [sys.executable, "-m", "shared_model.cli"]


def cli(*args: str, cwd: Path | None = None) -> str:
    """Run a ``perspective`` command to completion; its stdout."""
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 0, f"perspective {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def spawn(log: Path, *args: str) -> subprocess.Popen:
    """Start a long-running ``perspective`` command in its own session (log appended)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*CLI, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    """Signal a spawned process group and wait for it (SIGKILL if it lingers)."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def query(engine: sqlalchemy.Engine, sql: str, **params) -> list[tuple]:
    """Read the coordinator database (empty while ``serve`` is still creating it)."""
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sqlalchemy.text(sql), params)]
    except sqlalchemy.exc.SQLAlchemyError:
        return []


class Host:
    """The coordinator host: secrets, SuperLink, nginx and ``coordinator serve``."""

    def __init__(self, work: Path, ckpt: Path, db_url: str) -> None:
        self.work, self.ckpt, self.db_url = work, ckpt, db_url
        self.secrets = work / "secrets"
        out = cli("coordinator", "init", "--dir", str(self.secrets), "--host", "127.0.0.1",
                  "--db", db_url)  # fmt: skip
        self.engine = sqlalchemy.create_engine(db_url)
        self.operator_token = out.strip().splitlines()[-1]
        self.fingerprint = next(
            line.split(":", 1)[1].strip() for line in out.splitlines()
            if line.startswith("CA fingerprint:")
        )  # fmt: skip
        self.ca = self.secrets / "tls" / "ca.crt"
        tls_dir = self.secrets / "tls"
        self.tls = TLSFiles(self.ca, tls_dir / "server.crt", tls_dir / "server.key")
        self.superlink_port, self.api_port = free_port(), free_port()
        self.proxy_port, self.blob_port = free_port(), free_port()
        self.config = work / "tiny-units.yaml"
        self.config.write_text("train:\n  batch_size: 4\n  seq_len: 32\n")
        self.superlink: SuperLinkProcess | None = None
        self.serve: subprocess.Popen | None = None
        conf = render_nginx(work, self.proxy_port, f"127.0.0.1:{self.superlink_port}",
                            f"127.0.0.1:{self.api_port}", self._tls_paths())  # fmt: skip
        self.proxy = ManagedProcess("nginx", [NGINX, "-c", str(conf)], {}, work / "nginx.out", None)

    def _tls_paths(self):
        from coordinator.security import TlsMaterial

        return TlsMaterial(self.ca, self.secrets / "tls/ca.key", self.tls.cert, self.tls.key)

    @property
    def public_url(self) -> str:
        return f"https://127.0.0.1:{self.proxy_port}"

    def start(self) -> None:
        """Start (or restart after a crash) the SuperLink and ``serve``."""
        self.superlink = SuperLinkProcess(
            self.work / "superlink", port=self.superlink_port, database=self.work / "superlink.db",
            tls=self.tls, superexec_secret_file=self.secrets / "superexec.secret",
            enable_supernode_auth=True,
        )  # fmt: skip
        self.superlink.start()
        self.serve = spawn(
            self.work / "serve.log", "coordinator", "serve",
            "--secrets-dir", str(self.secrets), "--db", self.db_url,
            "--superlink", f"127.0.0.1:{self.superlink_port}",
            "--init", str(self.ckpt), "--work-dir", str(self.work / "coordinator"),
            "--preset", "tiny", "--config", str(self.config), "--minutes", "30",
            "--buffer-size", "1", "--steps-per-unit", "6", "--lease-seconds", "30",
            "--api-port", str(self.api_port), "--blob-port", str(self.blob_port),
            "--public-host", "127.0.0.1", "--fleet-address", f"127.0.0.1:{self.proxy_port}",
            "--key-sync-seconds", "1",
        )  # fmt: skip
        self.superlink.wait_until_ready(90)

    def crash(self) -> None:
        """``kill -9`` the coordinator and the SuperLink (a host going down)."""
        stop(self.serve, signal.SIGKILL)
        os.killpg(self.superlink.pid, signal.SIGKILL)
        self.superlink.shutdown(10)  # reaps it

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        """Call the REST API through the proxy as the operator."""
        headers = {"Authorization": f"Bearer {self.operator_token}"}
        return httpx.request(method, self.public_url + "/api/v1" + path, headers=headers,
                             verify=str(self.ca), timeout=30, **kw)  # fmt: skip

    def accepted(self, participant_id: int, after_id: int = 0) -> int:
        """How many of the participant's results with a row id above ``after_id`` are accepted."""
        rows = query(
            self.engine,
            "select count(*) from results where participant_id = :pid and state = 'accepted' "
            "and id > :after",
            pid=participant_id,
            after=after_id,
        )
        return rows[0][0] if rows else 0

    def last_result_id(self) -> int:
        rows = query(self.engine, "select max(id) from results")
        return (rows[0][0] or 0) if rows else 0

    def events(self, kind: str) -> list[tuple[str, int | None]]:
        sql = "select message, participant_id from events where kind = :kind"
        return query(self.engine, sql, kind=kind)

    def shutdown(self) -> None:
        stop(self.serve)
        if self.superlink is not None:
            self.superlink.shutdown(10)
        self.proxy.shutdown(5)
        self.engine.dispose()


@pytest.fixture
def db_url(tmp_path):
    """PostgreSQL, as deploy/compose.yaml runs it, where a server can start here; else SQLite."""
    servers = contextlib.ExitStack()
    try:
        url = servers.enter_context(postgres_server())
    except PostgresUnavailable as exc:
        print(f"\n{exc}: the coordinator uses SQLite")
        url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    with servers:
        yield url


@pytest.fixture
def host(tmp_path, tiny_moe_seed, db_url):
    h = Host(tmp_path, tiny_moe_seed[2], db_url)
    try:
        h.proxy.start()
        h.start()
        wait_for(lambda: _ok(h), 180, "the REST API through the proxy")
        yield h
    finally:
        h.shutdown()


def _ok(h: Host) -> bool:
    try:
        return h.api("GET", "/status").status_code == 200
    except httpx.HTTPError:
        return False


def test_volunteer_enrols_trains_survives_an_outage_and_is_revoked(host, tmp_path) -> None:
    volunteer = tmp_path / "volunteer"
    created = host.api("POST", "/enrolment-tokens", json={"note": "alice"})
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    # Without a pinned fingerprint the network's own CA is not trusted; with a wrong one
    # the join is refused before the token is sent. Either way nothing is written.
    wrong = "AB:" * 31 + "AB"
    for pin, refusal in (([], "give --ca-fingerprint"), (["--ca-fingerprint", wrong],
                                                          "do not enrol")):  # fmt: skip
        done = subprocess.run([*CLI, "participant", "join", host.public_url, "--token", token,
                               "--name", "alice", "--state-dir", str(volunteer), *pin],
                              capture_output=True, text=True)  # fmt: skip
        said = " ".join(done.stderr.replace("│", " ").split())  # typer wraps errors in a box
        assert done.returncode != 0 and refusal in said, done.stderr
        assert not (volunteer / "participant.json").exists()
    t_join = time.time()
    out = cli("participant", "join", host.public_url, "--token", token, "--name", "alice",
              "--state-dir", str(volunteer), "--ca-fingerprint", host.fingerprint,
              "--max-columns", "4", "--threads", "1")  # fmt: skip
    assert "matches the one you gave" in out, out
    enrolment = json.loads((volunteer / "participant.json").read_text())["enrolment"]
    pid = int(enrolment["participant_id"])
    assert enrolment["fleet_address"] == f"127.0.0.1:{host.proxy_port}", out
    assert Path(enrolment["ca_cert"]).read_bytes() == host.ca.read_bytes()
    daemon = spawn(tmp_path / "participant.log", "participant", "run",
                   "--state-dir", str(volunteer), "--config", str(host.config),
                   "--max-wait-time", "4")  # fmt: skip
    try:
        wait_for(lambda: host.accepted(pid), 300, "alice's first accepted result")
        print(f"\njoin -> first accepted result: {time.time() - t_join:.1f} s")
        assert host.events("participant.key_registered"), "serve did not register the key"
        _units_train_at_the_coordinators_lr(volunteer)
        _control_api_unreachable_through_proxy(host)
        _outage_then_next_result_accepted(host, pid, volunteer)
        _revoked_is_refused(host, pid, volunteer, daemon)
    finally:
        stop(daemon)
    _the_operator_guide_verbatim(host)


def _the_operator_guide_verbatim(host: Host) -> None:
    """The guide's token and operator-CLI blocks, as written, against this stack; the last
    command cancels stage 3, and ``serve`` ends it and exits 0."""
    said = run_guide_block("Tokens", {"PERSPECTIVE_DB": host.db_url}, cwd=host.work)
    assert "pspk_" in said and "grafana" in said, said
    env = {
        "PERSPECTIVE_COORDINATOR_URL": host.public_url,
        "PERSPECTIVE_TOKEN": host.operator_token,
        "PERSPECTIVE_SECRETS_DIR": str(host.secrets),
    }
    said = run_guide_block("Command line against a running coordinator", env, cwd=host.work)
    revoked = json.loads(said.split("--state revoked --json\n", 1)[1].split("\n$ ", 1)[0])
    assert [p["name"] for p in revoked["items"]] == ["alice"], said
    assert host.serve.wait(timeout=120) == 0, (host.work / "serve.log").read_text()[-3000:]
    jobs = query(host.engine, "select stage, state from stage_jobs order by id")
    # stage 4's job waits for a `serve --stage 4` to continue it
    assert jobs == [("stage3", "cancelled"), ("stage4", "running")], jobs


def _units_train_at_the_coordinators_lr(volunteer: Path) -> None:
    """The units ``serve`` leased carry its schedule's lr and its experts' share of it
    (``optim.expert_lr_scale``: 0.25 on ``tiny``), as the worker's progress file, which
    ``participant status`` reads, records them."""
    progress = read_progress(volunteer / "state")
    unit = progress.get("unit") or progress["last_unit"]
    assert unit["lr"] > 0 and unit["expert_lr"] == pytest.approx(0.25 * unit["lr"]), unit


def _control_api_unreachable_through_proxy(host: Host) -> None:
    for path in ("/v1/control/start-run", "/v1/control/register-node",
                 "/v1/control/list-runs", "/v1/runtime/acquire-task",
                 "/v1/fleet/../control/start-run", "/v1/%63ontrol/start-run"):  # fmt: skip
        resp = httpx.post(host.public_url + path, content=b"x", verify=str(host.ca))
        assert resp.status_code in (400, 403, 404), (path, resp.status_code)


def _events_text(volunteer: Path) -> str:
    """The volunteer daemon's event log so far ("" before its first event)."""
    path = volunteer / "events.jsonl"
    return path.read_text() if path.is_file() else ""


def _outage_then_next_result_accepted(host: Host, pid: int, volunteer: Path) -> None:
    host.crash()
    t_down, last = time.time(), host.last_result_id()
    # The SuperNode gives up after its max wait (4 s) and the daemon logs the disconnection;
    # the outage lasts at least that long.
    wait_for(lambda: "participant.disconnected" in _events_text(volunteer),
             120, "the daemon to notice the outage")  # fmt: skip
    host.start()
    wait_for(lambda: host.accepted(pid, after_id=last), 300, "a result accepted after the outage")
    print(f"outage -> next accepted result: {time.time() - t_down:.1f} s")


def _revoked_is_refused(host: Host, pid: int, volunteer: Path, daemon) -> None:
    reported_before = [e for e in host.events("participant.refused") if e[1] == pid]
    resp = host.api("POST", f"/participants/{pid}/revoke", json={"reason": "test"})
    assert resp.status_code == 200, resp.text
    wait_for(lambda: [e for e in host.events("participant.key_unregistered") if e[1] == pid],
             60, "the key's unregistration in the event log")  # fmt: skip

    def refusals() -> list[dict]:
        lines = _events_text(volunteer).splitlines()
        return [json.loads(line) for line in lines if '"participant.refused"' in line]

    refused = wait_for(refusals, 120, "the node's refusal")
    assert refused[-1]["data"]["reason"] in ("unauthorized", "key_not_registered"), refused[-1]
    last = host.last_result_id()
    # Its daemon reported the refusal through the proxy, signed with its node key; the
    # coordinator refused the report ("participant_revoked", nothing a revoked node says is
    # logged) and that answer stops the daemon for good, retrying nothing.
    assert daemon.wait(timeout=120) == 3
    assert [e for e in host.events("participant.refused") if e[1] == pid] == reported_before
    assert '"participant.revoked"' in _events_text(volunteer)
    said = (volunteer.parent / "participant.log").read_text()
    assert "revoked participant" in said and "participant join" in said, said[-3000:]
    assert "participant_revoked" in said, said[-3000:]  # the coordinator's answer to its report
    assert json.loads((volunteer / "status.json").read_text())["state"] == "revoked"
    assert host.accepted(pid, after_id=last) == 0, "a revoked participant's result was accepted"
