"""A silent node costs the network neither the whole cooldown nor a whole lease.

Flower reports an expired message as "Message Unavailable" (error code 3), for a dead node
and for a live one that was too slow to pull it alike. The loop stops leasing to the node
(``NODE_COOLDOWN_S``) and asks it to answer a ``collect``; a live node's answer lifts the
hold. Here the participant's worker is frozen (SIGSTOP) until every message of ours has
expired, then thawed: it must get work again and finish it well before the cooldown would
have run out by itself. Frozen again, it must not hold the end of the stage until the
last ``collect`` expires.
"""

from __future__ import annotations

import signal
import sqlite3
import time

import psutil
import pytest

from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.federation_settings import FederationSettings
from coordinator.local_network import LocalNetwork
from coordinator.node_status import NODE_COOLDOWN_S

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _step_until(loop, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        loop.step()


def _events(coord, kind: str) -> int:
    with sqlite3.connect(coord.work_dir / "coordinator.db") as db:
        return db.execute("select count(*) from events where kind = ?", (kind,)).fetchone()[0]


def _worker(net: LocalNetwork) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "worker" in argv and "participant" in argv and str(net.work_dir) in " ".join(argv):
            return proc
    raise AssertionError("no participant worker found")


@pytest.mark.timeout(400)
def test_a_silent_node_is_not_sidelined_for_the_cooldown_nor_waited_for_a_lease(
    tiny_moe_seed, tmp_path
):
    cfg, corpus, ckpt = tiny_moe_seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    settings = FederationSettings(
        stage=3, steps_per_unit=4, lease_seconds=10, eval_every=1000, eval_batches=2,
        buffer_size=1, units_hint=400, outer_momentum=0.0,
    )  # fmt: skip
    try:
        coord.prepare(ckpt, settings)
        with LocalNetwork(tmp_path / "net", n_participants=1) as net:
            driver = net.open_driver()
            loop = coord.federated_stage(driver, StageBudget(minutes=30), settings)
            _step_until(loop, lambda: _events(coord, "result.accepted") >= 1, 180, "a result")
            worker = _worker(net)
            worker.send_signal(signal.SIGSTOP)
            try:
                # Its leases expire and Flower reports its messages unavailable: held back.
                _step_until(loop, lambda: _events(coord, "participant.offline") >= 1, 120,
                            "the frozen node's messages to expire")  # fmt: skip
                frozen_until = time.monotonic() + 12  # past the TTL of anything still out
                _step_until(loop, lambda: time.monotonic() > frozen_until, 60, "the freeze")
            finally:
                worker.send_signal(signal.SIGCONT)
            accepted = _events(coord, "result.accepted")
            thawed = time.monotonic()
            _step_until(loop, lambda: _events(coord, "result.accepted") > accepted,
                        NODE_COOLDOWN_S / 2, "a result from the thawed node")  # fmt: skip
            print(f"\nthawed -> next accepted result: {time.monotonic() - thawed:.1f} s")
            _a_silent_node_holds_the_end_of_the_stage_for_its_units_only(loop, worker)
            driver.close()
    finally:
        coord.shutdown()


def _a_silent_node_holds_the_end_of_the_stage_for_its_units_only(loop, worker) -> None:
    """A node that never answers the end-of-stage ``collect`` (here frozen again; in the
    wild a lost message, or a SuperNode left on a stopped run) holds the end of the stage
    for its units' training time, not until the ``collect`` expires (it lives a lease:
    a 1-minute demo hung 5 minutes on one lost reply)."""
    ttl = 240.0
    worker.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        loop.collect(timeout=ttl)
        waited = time.monotonic() - started
    finally:
        worker.send_signal(signal.SIGCONT)
    print(f"end of stage with a silent node: waited {waited:.1f} s")
    assert loop.ended and loop.driver.pending, "the frozen node answered?"
    assert waited < ttl / 3, waited
