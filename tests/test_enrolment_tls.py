"""Enrolment, TLS and SuperNode authentication end to end through ``coordinator serve``.

The secure stack as an operator runs it without Docker or nginx (so this runs on every
machine; ``test_secure_network.py`` adds the proxy where nginx is installed):

* ``perspective coordinator init`` writes the CA, server certificate, SuperExec secret,
  blob-token key and the first operator token;
* ``flower-superlink`` with TLS, ``--enable-supernode-auth``, the SuperExec secret and a
  database; its Fleet API is what volunteers dial (``serve --fleet-address``);
* ``perspective coordinator serve --secrets-dir --db --api-port``: TLS REST API and blob
  service, node-key sync every second, the federation loop;
* volunteers: ``perspective participant join`` (CA fingerprint pinned) and ``perspective
  participant run``.

One volunteer trains (a result accepted over TLS), is revoked by the operator, is refused,
reports it, and its daemon stops for good with exit code 3 and a message saying why.
Refusals (unregistered key, wrong CA, no TLS) end the SuperNode with exit code 305 and the
reason reaches the coordinator's event log: the daemon reports it to the REST API, signed
with its enrolled node key (``participant.report``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy

from coordinator.flower.superlink import SuperLinkProcess, TLSFiles
from coordinator.security import make_tls
from participant.daemon import DaemonConfig, ParticipantDaemon
from participant.join import join
from participant.limits import Limits
from participant.report import NodeReporter
from shared_model.identity import make_node_key
from shared_model.processes import free_port
from tests.conftest import wait_for
from tests.test_deploy_proxy import NGINX
from tests.test_secure_network import CLI, cli, query, spawn, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]


class SecureServe:
    """``coordinator init`` + TLS SuperLink with node auth + ``coordinator serve``."""

    def __init__(self, work: Path, ckpt: Path) -> None:
        self.work = work
        self.secrets = work / "secrets"
        self.db_url = f"sqlite:///{work / 'coordinator.db'}"
        out = cli("coordinator", "init", "--dir", str(self.secrets), "--host", "127.0.0.1",
                  "--db", self.db_url)  # fmt: skip
        self.operator_token = out.strip().splitlines()[-1]
        self.fingerprint = next(
            line.split(":", 1)[1].strip() for line in out.splitlines()
            if line.startswith("CA fingerprint:")
        )  # fmt: skip
        tls = self.secrets / "tls"
        self.ca = tls / "ca.crt"
        self.superlink = SuperLinkProcess(
            work / "superlink", database=work / "superlink.db",
            tls=TLSFiles(self.ca, tls / "server.crt", tls / "server.key"),
            superexec_secret_file=self.secrets / "superexec.secret",
            enable_supernode_auth=True,
        )  # fmt: skip
        self.api_port = free_port()
        self.url = f"https://127.0.0.1:{self.api_port}"
        self.config = work / "tiny-units.yaml"
        self.config.write_text("train:\n  batch_size: 4\n  seq_len: 32\n")
        self.ckpt = ckpt
        self.engine = sqlalchemy.create_engine(self.db_url)
        self.serve: subprocess.Popen | None = None

    def start(self) -> None:
        self.superlink.start()
        self.serve = spawn(
            self.work / "serve.log", "coordinator", "serve",
            "--secrets-dir", str(self.secrets), "--db", self.db_url,
            "--superlink", self.superlink.address, "--fleet-address", self.superlink.address,
            "--init", str(self.ckpt), "--work-dir", str(self.work / "coordinator"),
            "--preset", "tiny", "--config", str(self.config), "--minutes", "30",
            "--buffer-size", "1", "--steps-per-unit", "6", "--lease-seconds", "30",
            "--api-port", str(self.api_port), "--public-host", "127.0.0.1",
            "--key-sync-seconds", "1",
        )  # fmt: skip
        self.superlink.wait_until_ready(90)
        wait_for(self._up, 180, "serve's REST API over TLS")

    def _up(self) -> bool:
        assert self.serve.poll() is None, (self.work / "serve.log").read_text()[-3000:]
        try:
            return self.api("GET", "/status").status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        """The REST API as the operator, verified with the network's CA."""
        headers = {"Authorization": f"Bearer {self.operator_token}"}
        return httpx.request(method, f"{self.url}/api/v1{path}", headers=headers,
                             verify=str(self.ca), timeout=30, **kw)  # fmt: skip

    def enrolment_token(self) -> str:
        created = self.api("POST", "/enrolment-tokens", json={"note": "test"})
        assert created.status_code == 201, created.text
        return created.json()["token"]

    def events(self, kind: str, participant_id: int) -> list[tuple]:
        sql = "select message, data from events where kind = :kind and participant_id = :pid"
        return query(self.engine, sql, kind=kind, pid=participant_id)

    def accepted(self, participant_id: int) -> int:
        sql = "select count(*) from results where participant_id = :pid and state = 'accepted'"
        rows = query(self.engine, sql, pid=participant_id)
        return rows[0][0] if rows else 0

    def shutdown(self) -> None:
        stop(self.serve)
        self.superlink.shutdown(10)
        self.engine.dispose()


@pytest.fixture(scope="module")
def host(tmp_path_factory, tiny_moe_seed):
    h = SecureServe(tmp_path_factory.mktemp("secure"), tiny_moe_seed[2])
    try:
        h.start()
        yield h
    finally:
        h.shutdown()


def test_a_foreign_key_is_unregistered_within_one_key_sync_period(host, tmp_path) -> None:
    """Issue 16: a key registered on the SuperLink with stock ``flwr supernode register``
    (the Control API has no authentication) is unregistered by ``serve``'s key sync within
    one period; no participant is created for it. First in the module, while ``serve``
    still runs its stage."""
    import os
    import time

    from coordinator.security import list_nodes

    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "net"\n\n[superlink.net]\n'
        f'address = "{host.superlink.address}"\nroot-certificates = "{host.ca}"\n'
    )
    _, public = make_node_key(tmp_path / "intruder")
    nodes = lambda: set(list_nodes(host.superlink.address, root_certificates=host.ca.read_bytes()))  # noqa: E731
    before = nodes()
    (last_event,) = query(host.engine, "select coalesce(max(id), 0) from events")[0]
    flwr = Path(sys.executable).with_name("flwr")
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(
        [str(flwr), "supernode", "register", str(tmp_path / "intruder.pub"), "net"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # serve's key sync may unregister it before we list the nodes again: its event names it.
    sql = "select data from events where kind = 'participant.key_foreign' and id > :after"

    def unregistered() -> list[int]:
        rows = query(host.engine, sql, after=last_event)
        ids = [json.loads(d)["node_id"] if isinstance(d, str) else d["node_id"] for (d,) in rows]
        return [i for i in ids if i not in before]

    t0 = time.monotonic()
    (foreign,) = wait_for(unregistered, 60, "the foreign node to be unregistered")
    print(f"\nforeign node {foreign} unregistered {time.monotonic() - t0:.1f} s after register")
    assert foreign not in nodes()
    # (node ids are uint64, beyond SQLite's integers: the key names the would-be row)
    sql = "select count(*) from participants where public_key = :k"
    assert query(host.engine, sql, k=public)[0][0] == 0


def test_a_key_unregistered_by_hand_is_reported_once_not_at_every_key_sync(host, tmp_path):
    """Key sync re-registers a key someone unregistered on the SuperLink by hand; Flower
    1.42 refuses a key it has seen ("Public key already in use": its node table keeps the
    key, unique, with the node marked unregistered), so the volunteer must enrol again.
    The event log says so once, not at every pass (every second here)."""
    from coordinator.db import make_session_factory
    from coordinator.key_sync import KeySync
    from coordinator.security import list_nodes, unregister_node

    enrolment = join(host.url, host.enrolment_token(), "vol-unregistered", tmp_path / "v",
                     pinned_fingerprint=host.fingerprint)  # fmt: skip
    pid, certs = enrolment.participant_id, host.ca.read_bytes()
    (_, data), *_ = wait_for(lambda: host.events("participant.key_registered", pid), 60,
                             "the volunteer's key registered")  # fmt: skip
    node_id = json.loads(data)["node_id"]
    unregister_node(host.superlink.address, node_id, root_certificates=certs)
    refused = wait_for(lambda: host.events("participant.key_refused", pid), 60, "key sync")
    assert "already in use" in refused[0][0], refused
    assert node_id not in list_nodes(host.superlink.address, root_certificates=certs)
    sync = KeySync(make_session_factory(host.engine), host.superlink.address,
                   root_certificates=certs)  # fmt: skip
    for _ in range(3):  # three more passes (serve's own run every second too)
        assert sync.sync_once() is not None, sync.last_error
    assert len(host.events("participant.key_missing", pid)) == 1
    assert len(host.events("participant.key_refused", pid)) == 1


@pytest.mark.skipif(
    NGINX is not None,
    reason="test_secure_network runs this volunteer (join refusals, training over TLS, "
    "revocation: exit 3) through nginx",
)
def test_volunteer_joins_trains_over_tls_and_stops_for_good_when_revoked(host, tmp_path):
    volunteer, token = tmp_path / "alice", host.enrolment_token()
    # Without the CA's fingerprint the network's own certificate is not trusted: the join
    # fails saying what to give, and leaves nothing behind (no fresh key).
    first = subprocess.run([*CLI, "participant", "join", host.url, "--token", token,
                            "--name", "alice", "--state-dir", str(volunteer)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    said = " ".join(first.stderr.replace("│", " ").split())
    assert first.returncode != 0 and "give --ca-fingerprint" in said, said
    assert not volunteer.exists()
    out = cli("participant", "join", host.url, "--token", token,
              "--name", "alice", "--state-dir", str(volunteer),
              "--ca-fingerprint", host.fingerprint, "--max-columns", "2")  # fmt: skip
    assert "matches the one you gave" in out, out
    enrolment = json.loads((volunteer / "participant.json").read_text())["enrolment"]
    pid = int(enrolment["participant_id"])
    assert enrolment["fleet_address"] == host.superlink.address
    assert Path(enrolment["ca_cert"]).read_bytes() == host.ca.read_bytes()
    log = tmp_path / "participant.log"
    daemon = spawn(log, "participant", "run", "--state-dir", str(volunteer),
                   "--config", str(host.config), "--max-wait-time", "4")  # fmt: skip
    try:
        wait_for(lambda: host.accepted(pid), 300, "alice's first accepted result (over TLS)")
        resp = host.api("POST", f"/participants/{pid}/revoke", json={"reason": "test"})
        assert resp.status_code == 200, resp.text
        wait_for(lambda: host.events("participant.key_unregistered", pid), 60,
                 "the key's unregistration")  # fmt: skip
        # Refused, reported (signed), the report refused as a revoked node's: the daemon
        # stops for good.
        code = daemon.wait(timeout=180)
    finally:
        stop(daemon)
    said = log.read_text()
    assert code == 3, said[-3000:]
    assert "revoked participant" in said and "participant join" in said, said[-3000:]
    assert "participant_revoked" in said, said[-3000:]  # the answer to its report
    reports = [m for m, d in host.events("participant.refused", pid) if "reported_by_node" in d]
    assert reports == [], "a revoked node's report was logged"
    events = (volunteer / "events.jsonl").read_text()
    assert '"participant.revoked"' in events
    status = json.loads((volunteer / "status.json").read_text())
    assert status["state"] == "revoked"


def _idle_worker() -> list[str]:
    # Refusals happen before any message reaches the worker: a placeholder process keeps
    # three concurrent volunteers cheap (the real worker is exercised in the test above).
    return [sys.executable, "-c", "import time; time.sleep(600)"]


def test_refused_nodes_exit_305_and_coordinator_logs_why(host, tmp_path) -> None:
    """An enrolled volunteer whose node key the SuperLink does not know, one given another
    CA, one connecting without TLS: all three at once."""
    cases = {"unregistered_key": "key_not_registered", "wrong_ca": "tls_untrusted",
             "no_tls": "tls_required"}  # fmt: skip
    daemons = {}
    try:
        for case in cases:
            state = tmp_path / case
            enrolment = join(host.url, host.enrolment_token(), f"vol-{case}", state,
                             pinned_fingerprint=host.fingerprint)  # fmt: skip
            kw: dict = {"root_certificates": Path(enrolment.ca_cert),
                        "auth_private_key": Path(enrolment.key)}  # fmt: skip
            if case == "unregistered_key":  # serve syncs enrolled keys: use another one
                kw["auth_private_key"] = make_node_key(tmp_path / "stranger.key")[0]
            elif case == "wrong_ca":
                kw["root_certificates"] = make_tls(tmp_path / "other-ca", ["127.0.0.1"]).ca_cert
            else:
                # Flower 1.42 retries a plain-HTTP node against a TLS server as if it were
                # down and only exits (305) after max_wait_time.
                kw = {"max_wait_time": 4.0}
            cfg = DaemonConfig(state_dir=state, superlink_address=host.superlink.address,
                               backoff_initial=60.0, limits=Limits(threads=1, max_columns=2),
                               worker_argv=_idle_worker(), **kw)  # fmt: skip
            daemons[case] = (
                enrolment,
                ParticipantDaemon(cfg, on_event=NodeReporter(enrolment).sink),
            )
            daemons[case][1].start()
        for case, (enrolment, _) in daemons.items():
            wait_for(lambda e=enrolment: _reported(host, e.participant_id), 120,
                     f"the node's report ({case})")  # fmt: skip
    finally:
        for _, d in daemons.values():
            d.shutdown()
    for case, (enrolment, d) in daemons.items():
        assert d.last_refusal["exit_code"] == 305, (case, d.last_refusal)
        assert d.last_refusal["reason"] == cases[case], case
        message, data = _reported(host, enrolment.participant_id)[0]
        assert json.loads(data)["reason"] == cases[case] and enrolment.name in message


def _reported(host, participant_id: int) -> list[tuple]:
    events = host.events("participant.refused", participant_id)
    return [(m, d) for m, d in events if "reported_by_node" in d]


def test_serve_refuses_a_second_coordinator_on_its_superlink(host, tmp_path) -> None:
    """One coordinator per SuperLink: a second ``serve`` exits at once, saying why."""
    argv = [*CLI, "coordinator", "serve", "--secrets-dir", str(host.secrets),
            "--db", f"sqlite:///{tmp_path / 'second.db'}", "--superlink", host.superlink.address,
            "--init", str(host.ckpt), "--work-dir", str(tmp_path / "second"),
            "--preset", "tiny", "--config", str(host.config), "--minutes", "1"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    said = " ".join(done.stderr.split())
    assert done.returncode == 1, said[-3000:]
    assert "another Perspective coordinator holds the SuperLink" in said, said[-3000:]
    assert host.serve.poll() is None  # the first one goes on
