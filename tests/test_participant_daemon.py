"""The participant daemon against a real SuperLink: restarts, limits, resource use.

* The SuperLink is killed for longer than the participant's first retry delay and its
  SuperNode's ``max_wait_time``; it comes back on the same ``--database`` and port, and
  the daemon resumes by itself: the next control message is answered.
* The worker is the real ``perspective participant worker`` started by the daemon with
  the volunteer's limits (threads, columns, cache cap), checked in its reply.
* Idle RSS and CPU of the daemon's processes are measured with psutil (``pytest -s``).
"""

from __future__ import annotations

import datetime as dt
import time

import pytest

from coordinator.flower.run import open_driver
from coordinator.flower.superlink import SuperLinkProcess
from participant.daemon import DaemonConfig, ParticipantDaemon, classify_exit, tree_usage
from participant.hardware import detect
from participant.limits import Limits, LimitsError, TokenBucket
from participant.status import read_status
from shared_model.processes import free_port
from shared_model.wire.perspective.v1 import control_pb2
from tests.conftest import wait_for

COLLECT = control_pb2.ControlRequest(collect=True).SerializeToString()


def exchange(driver, timeout: float = 90, avoid: int | None = None) -> control_pb2.ControlReply:
    """``query.collect`` to the first online node other than ``avoid``."""
    deadline = time.monotonic() + timeout
    while not [n for n in driver.node_ids() if n != avoid]:
        assert time.monotonic() < deadline, "participant never came online"
        time.sleep(0.2)
    target = [n for n in driver.node_ids() if n != avoid][0]
    driver.push(target, COLLECT, "query.collect", ttl=timeout)
    replies = []
    while not replies and time.monotonic() < deadline:
        replies = driver.wait_any(deadline - time.monotonic())
    assert replies and replies[0].ok, replies
    return control_pb2.ControlReply.FromString(replies[0].payload)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_daemon_resumes_after_superlink_outage(tmp_path) -> None:
    db = tmp_path / "superlink.db"
    superlink = SuperLinkProcess(tmp_path / "superlink", database=db)
    limits = Limits(threads=1, max_columns=3, cache_cap_mb=5)
    cfg = DaemonConfig(
        tmp_path / "participant",
        superlink.address,
        limits=limits,
        max_wait_time=3.0,  # the node gives up quickly; the daemon's back-off takes over
        backoff_initial=1.0,
        backoff_max=4.0,
        poll_interval=0.5,  # participant run --poll-interval: through the launcher
    )
    daemon = ParticipantDaemon(cfg)
    driver = None
    try:
        superlink.start()
        superlink.wait_until_ready(90)
        daemon.start()
        driver = open_driver(superlink.address, superexec_secret=superlink.superexec_secret)
        reply = exchange(driver)
        assert (reply.capability.threads, reply.capability.max_columns) == (1, 3)
        assert reply.capability.device == detect().device and reply.capability.ram_bytes > 0
        progress = read_status(tmp_path / "participant", sample_s=0.0)["progress"]
        assert progress["threads"] == 1 and progress["device"] == reply.capability.device
        node_id = driver.node_ids()[0]
        usage = tree_usage(daemon.pids(), interval=2.0)
        print(
            f"\nidle participant (SuperNode + worker): RSS {usage['rss_bytes'] / 1e6:.0f} MB, "
            f"CPU {usage['cpu_percent']:.1f} % over 2 s, {usage['processes']:.0f} processes"
        )
        driver.close()
        driver = None
        superlink.shutdown(10)
        t_down = time.monotonic()
        # The SuperNode gives up after its max_wait_time (3 s) and the daemon restarts it.
        wait_for(lambda: daemon.restarts >= 1, 60, "the daemon to restart the SuperNode")
        assert daemon.worker_alive()
        superlink = SuperLinkProcess(tmp_path / "superlink", port=superlink.port, database=db)
        superlink.start()
        superlink.wait_until_ready(90)
        driver = open_driver(superlink.address, superexec_secret=superlink.superexec_secret)
        # Without node auth Flower gives a restarted SuperNode a new id (with auth it is
        # stable, see test_enrolment_tls); the old id lingers until its heartbeat times out.
        reply = exchange(driver, avoid=node_id)
        print(f"outage -> first answered message: {time.monotonic() - t_down:.1f} s")
        assert reply.capability.threads == 1
        # The restarted SuperNode is Flower's own, run with its poll capped.
        argv = daemon.supernode.argv
        assert "participant.flower.supernode_main" in argv, argv
        assert argv[argv.index("--poll-interval") + 1] == "0.5"
        events = (tmp_path / "participant" / "events.jsonl").read_text()
        assert "participant.disconnected" in events and "coordinator_unreachable" in events
    finally:
        if driver is not None:
            driver.close()
        daemon.shutdown()
        superlink.shutdown(10)
    assert daemon.pids() == []


def test_limits_validation_schedule_and_worker_args(tmp_path) -> None:
    lim = Limits(threads=2, max_columns=1, cache_cap_mb=50, schedule="22:00-07:00")
    assert lim.worker_args() == ["--threads", "2", "--max-columns", "1", "--cache-cap-mb", "50"]
    assert lim.in_window(dt.datetime(2024, 1, 1, 23, 0))
    assert lim.in_window(dt.datetime(2024, 1, 1, 6, 59))
    assert not lim.in_window(dt.datetime(2024, 1, 1, 12, 0))
    lim.save(tmp_path / "limits.json")
    assert Limits.load(tmp_path / "limits.json") == lim
    with pytest.raises(LimitsError, match="22:00-07:00"):
        Limits(schedule="late")
    with pytest.raises(LimitsError, match="threads"):
        Limits(threads=0)
    bucket = TokenBucket(1_000_000)  # 1 MB/s, 1 MB burst
    t0 = time.monotonic()
    bucket.consume(1_000_000)
    bucket.consume(300_000)
    assert time.monotonic() - t0 >= 0.25


def test_classify_exit_reasons() -> None:
    assert classify_exit(1, "[code: 2004] Failed to activate SuperNode.")[0] == "key_not_registered"
    assert classify_exit(1, "ssl.SSLCertVerificationError: CERTIFICATE_VERIFY_FAILED")[0] == (
        "tls_untrusted"
    )
    assert classify_exit(0, "SuperNode terminated gracefully.")[0] == "coordinator_unreachable"
    plain_to_tls = "Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n" + (
        "[Errno 104] Connection reset by peer"
    )
    assert classify_exit(-15, plain_to_tls)[0] == "tls_required"
    said = "Client error '401 Unauthorized' for url 'https://127.0.0.1:9093/v1/fleet/pull-messages'"
    assert classify_exit(1, said)[0] == "unauthorized"
    # Ids that happen to contain "401" are not a refusal (an outage was once taken for one).
    outage = "[RUN 14016455301708971284]\nSuperNode ID: 4401\nSuperNode terminated gracefully."
    assert classify_exit(0, outage)[0] == "coordinator_unreachable"


def _events(state_dir) -> list[str]:
    path = state_dir / "events.jsonl"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_ram_cap_restarts_the_worker_and_schedule_pauses_everything(tmp_path) -> None:
    # RAM: a real worker (torch imported: hundreds of MB) under a 50 MB cap is restarted.
    nowhere = f"127.0.0.1:{free_port()}"  # no SuperLink: the worker runs regardless
    capped = ParticipantDaemon(
        DaemonConfig(tmp_path / "capped", nowhere, limits=Limits(ram_cap_mb=50), max_wait_time=60)
    )
    capped.start()
    try:
        deadline = time.monotonic() + 90
        while not any("participant.ram_cap" in e for e in _events(tmp_path / "capped")):
            assert time.monotonic() < deadline, "the RAM cap was never enforced"
            time.sleep(0.5)
        while not any("participant.worker_restart" in e for e in _events(tmp_path / "capped")):
            assert time.monotonic() < deadline, "the worker was not restarted after the cap"
            time.sleep(0.5)
    finally:
        capped.shutdown()
    # Schedule: outside the window nothing runs at all.
    now = dt.datetime.now()
    start, end = now + dt.timedelta(hours=2), now + dt.timedelta(hours=3)
    window = f"{start:%H:%M}-{end:%H:%M}"
    paused = ParticipantDaemon(
        DaemonConfig(tmp_path / "night", nowhere, limits=Limits(schedule=window))
    )
    paused.start()
    try:
        wait_for(lambda: paused.state == "paused (schedule)", 30, "the daemon to pause")
        assert paused.pids() == []
    finally:
        paused.shutdown()


def _enrolled_nowhere(state_dir) -> None:
    """A ``participant.json`` as ``join`` writes it, for a coordinator without TLS that is
    not there (the daemon then connects and backs off forever)."""
    import json

    state_dir.mkdir(parents=True)
    enrolment = {"participant_id": 1, "name": "v", "fleet_address": f"127.0.0.1:{free_port()}",
                 "ca_cert": None, "key": str(state_dir / "node.key"),
                 "coordinator_url": f"http://127.0.0.1:{free_port()}"}  # fmt: skip
    (state_dir / "participant.json").write_text(json.dumps({"enrolment": enrolment}))


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("state", ["connecting", "waiting"])
def test_participant_run_stops_within_2_s_of_sigterm(tmp_path, state) -> None:
    """``participant run`` (the real command) while its SuperNode connects, and while it
    waits out its back-off after the SuperNode gave up: gone within 2 s, children too."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    volunteer = tmp_path / "volunteer"
    _enrolled_nowhere(volunteer)
    argv = [sys.executable, "-m", "shared_model.cli", "participant", "run",
            "--state-dir", str(volunteer), "--max-wait-time", "2"]  # fmt: skip
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:

        def children() -> list[int]:
            status = read_status(volunteer, sample_s=0)
            pids = [status.get("supernode_pid"), status.get("worker_pid")]
            return [p for p in pids if p and psutil.pid_exists(p)]

        wait_for(lambda: read_status(volunteer, sample_s=0)["state"].startswith(state)
                 and len(children()) == (2 if state == "connecting" else 1), 120,
                 f"the daemon {state} with its children up")  # fmt: skip
        pids = children()
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 2.0, f"SIGTERM took {took:.1f} s ({state})"
    assert proc.returncode == 0 and read_status(volunteer, sample_s=0)["state"] == "stopped"
    assert [p for p in pids if psutil.pid_exists(p)] == []
