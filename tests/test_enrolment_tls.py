"""Enrolment, TLS and SuperNode authentication end to end on 127.0.0.1.

Real processes throughout: a SuperLink with TLS (our own CA from ``coordinator.security``),
``--enable-supernode-auth`` and a database; the coordinator's REST API (enrolment) on a
real SQLite database; participant daemons supervising a real ``flower-supernode`` and a
real ``perspective participant worker``. The coordinator driver exchanges a
``query.collect`` control message with the enrolled node.

Refusals (unregistered key, wrong CA, no TLS, revoked) must end the SuperNode with exit
code 305 and the reason must reach the coordinator's event log: the volunteer's daemon
reports it to the REST API, signed with its enrolled node key (``participant.report``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coordinator.api import ApiSettings, create_app
from coordinator.db import init_db, make_session_factory, sqlite_url
from coordinator.db.events import list_events
from coordinator.db.participants import revoke_participant
from coordinator.db.tokens import create_enrolment_token
from coordinator.flower.run import open_driver
from coordinator.flower.superlink import SuperLinkProcess, TLSFiles
from coordinator.metrics import CoordinatorMetrics
from coordinator.security import make_tls, sync_participant_keys
from coordinator.serve_api import ApiServer
from participant.daemon import DaemonConfig, ParticipantDaemon
from participant.join import join
from participant.limits import Limits
from participant.report import NodeReporter
from shared_model.wire.perspective.v1 import control_pb2
from tests.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]
COLLECT = control_pb2.ControlRequest(collect=True).SerializeToString()


class Coordinator:
    """TLS SuperLink with node auth + REST API + DB + driver."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.tls = make_tls(work / "tls", ["127.0.0.1", "localhost"])
        self.ca = self.tls.ca_cert.read_bytes()
        self.superlink = SuperLinkProcess(
            work / "superlink",
            database=work / "superlink.db",
            tls=TLSFiles(self.tls.ca_cert, self.tls.cert, self.tls.key),
            enable_supernode_auth=True,
        )
        self.factory = make_session_factory(init_db(sqlite_url(work / "coord.db")))
        settings = ApiSettings(ca_cert_path=self.tls.ca_cert, fleet_address=self.superlink.address)
        self.api = ApiServer(create_app(self.factory, settings, metrics=CoordinatorMetrics()))
        self.driver = None

    def start(self) -> None:
        self.superlink.start()
        self.api.start().wait_until_ready()
        self.superlink.wait_until_ready(90)
        self.driver = open_driver(
            self.superlink.address,
            superexec_secret=self.superlink.superexec_secret,
            insecure=False,
            root_certificates=self.ca,
        )

    def sync(self) -> dict[str, list[int]]:
        return sync_participant_keys(
            self.factory, self.superlink.address, root_certificates=self.ca
        )

    def enrolment_token(self) -> str:
        with self.factory.begin() as session:
            return create_enrolment_token(session, note="test")[0]

    def events(self, kind: str) -> list:
        with self.factory() as session:
            return [e for e in list_events(session, limit=500).items if e.kind == kind]

    def node_id(self, participant_id: int) -> int | None:
        from coordinator.db.participants import get_participant

        with self.factory() as session:
            return get_participant(session, participant_id=participant_id).node_id

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.close()
        self.api.shutdown()
        self.superlink.shutdown()


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    c = Coordinator(tmp_path_factory.mktemp("tls"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def exchange(coord: Coordinator, node_id: int, timeout: float = 60) -> control_pb2.ControlReply:
    """Push a ``query.collect`` to ``node_id`` and wait for its successful reply."""
    deadline = time.monotonic() + timeout
    while node_id not in coord.driver.node_ids():
        assert time.monotonic() < deadline, f"node {node_id} never came online"
        time.sleep(0.2)
    coord.driver.push(node_id, COLLECT, "query.collect", ttl=timeout)
    replies = []
    while not replies and time.monotonic() < deadline:
        replies = coord.driver.wait_any(deadline - time.monotonic())
    assert replies and replies[0].ok, replies
    return control_pb2.ControlReply.FromString(replies[0].payload)


def daemon(coord, state: Path, reporter: NodeReporter, **kw) -> ParticipantDaemon:
    cfg = DaemonConfig(
        state_dir=state,
        superlink_address=coord.superlink.address,
        backoff_initial=60.0,  # one attempt is enough to see each refusal
        limits=Limits(threads=1, max_columns=2),
        **kw,
    )
    d = ParticipantDaemon(cfg, on_event=reporter.sink)
    d.start()
    return d


def reported(coord, participant_id: int) -> list:
    """``participant.refused`` events the participant's daemon reported to the coordinator."""
    return [e for e in coord.events("participant.refused")
            if e.participant_id == participant_id and e.data.get("reported_by_node")]  # fmt: skip


def test_a_foreign_key_is_unregistered_within_one_key_sync_period(coord, tmp_path) -> None:
    """Issue 16: a key registered on the SuperLink with stock ``flwr supernode register``
    (the Control API has no authentication) is unregistered by the running key sync within
    one period; no participant is created for it and enrolled nodes are left alone."""
    import os
    import subprocess
    import sys

    from coordinator.key_sync import KeySync
    from coordinator.security import list_nodes
    from shared_model.identity import make_node_key

    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "net"\n\n[superlink.net]\n'
        f'address = "{coord.superlink.address}"\nroot-certificates = "{coord.tls.ca_cert}"\n'
    )
    _, public = make_node_key(tmp_path / "intruder")
    flwr = Path(sys.executable).with_name("flwr")
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(
        [str(flwr), "supernode", "register", str(tmp_path / "intruder.pub"), "net"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    nodes = lambda: list_nodes(coord.superlink.address, root_certificates=coord.ca)  # noqa: E731
    (foreign,) = set(nodes()) - {coord.node_id(p) for p in _participant_ids(coord)}
    period = 2.0
    sync = KeySync(
        coord.factory, coord.superlink.address, root_certificates=coord.ca, period_s=period
    ).start()
    try:
        t0 = time.monotonic()
        wait_for(lambda: foreign not in nodes(), 30, "the foreign node to be unregistered")
        took = time.monotonic() - t0
    finally:
        sync.shutdown()
    assert took <= period + 5, took  # the next pass at the latest (+ the pass's own time)
    assert [e.data["node_id"] for e in coord.events("participant.key_foreign")] == [foreign]
    from coordinator.db.models import Participant
    from coordinator.db.participants import find_participant

    with coord.factory() as session:
        assert find_participant(session, node_id=foreign) is None
        assert session.query(Participant).filter_by(public_key=public).count() == 0


def _participant_ids(coord) -> list[int]:
    from coordinator.db.models import Participant

    with coord.factory() as session:
        return [p.id for p in session.query(Participant)]


def test_enrolled_participant_exchanges_then_revoked_is_refused(coord, tmp_path) -> None:
    t0 = time.monotonic()
    enrolment = join(coord.api.url, coord.enrolment_token(), "alice", tmp_path / "alice")
    assert Path(enrolment.ca_cert).read_bytes() == coord.ca
    assert coord.sync()["registered"] == [enrolment.participant_id]
    node_id = coord.node_id(enrolment.participant_id)
    d = daemon(
        coord,
        tmp_path / "alice",
        NodeReporter(enrolment),
        root_certificates=Path(enrolment.ca_cert),
        auth_private_key=Path(enrolment.key),
    )
    try:
        reply = exchange(coord, node_id)
        print(f"\njoin -> first message exchanged: {time.monotonic() - t0:.1f} s")
        assert reply.capability.threads == 1 and reply.capability.max_columns == 2
        # Revoke: the coordinator unregisters the key; the node is thrown out for good.
        with coord.factory.begin() as session:
            revoke_participant(session, participant_id=enrolment.participant_id, reason="test")
        assert coord.sync()["unregistered"] == [enrolment.participant_id]
        refused = wait_for(
            lambda: reported(coord, enrolment.participant_id), 90, "the revoked node's report"
        )
        assert refused[0].data["reason"] in ("unauthorized", "key_not_registered")
        assert node_id not in coord.driver.node_ids()
    finally:
        d.shutdown()


@pytest.mark.parametrize("case", ["unregistered_key", "wrong_ca", "no_tls"])
def test_refused_nodes_exit_305_and_coordinator_logs_why(coord, tmp_path, case) -> None:
    # An enrolled volunteer whose key the SuperLink does not know (not synced), or who was
    # given another CA, or who connects without TLS.
    enrolment = join(coord.api.url, coord.enrolment_token(), f"vol-{case}", tmp_path / case)
    kw: dict = {
        "root_certificates": Path(enrolment.ca_cert),
        "auth_private_key": Path(enrolment.key),
    }
    expected = "key_not_registered"
    if case == "wrong_ca":
        kw["root_certificates"] = make_tls(tmp_path / "other-ca", ["127.0.0.1"]).ca_cert
        expected = "tls_untrusted"
    elif case == "no_tls":
        # Flower 1.42 retries a plain-HTTP node against a TLS server as if it were down and
        # only exits (305, "Server disconnected...") after max_wait_time.
        kw = {"max_wait_time": 8.0}
        expected = "tls_required"
    d = daemon(coord, tmp_path / case, NodeReporter(enrolment), **kw)
    try:
        events = wait_for(
            lambda: reported(coord, enrolment.participant_id), 90, f"the node's report ({case})"
        )
    finally:
        d.shutdown()
    assert d.last_refusal["exit_code"] == 305, d.last_refusal
    assert d.last_refusal["reason"] == expected
    assert events[0].data["reason"] == expected, events[0].message
    assert enrolment.name in events[0].message
