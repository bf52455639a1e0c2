"""The federated loop over a real local Flower network (SuperLink + SuperNodes + workers).

The tests share one network and run in file order; the participant-kill test is last
because it leaves one participant dead.

Everything is real and on 127.0.0.1: the SuperLink and SuperNodes are Flower's own
processes, the participants are ``perspective participant worker`` processes, blobs move
over the gRPC blob service, and the coordinator is either in-process (first test) or a
``perspective coordinator serve`` process that is SIGKILLed and restarted (second test).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import torch

from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db.types import UInt64
from coordinator.federation_settings import FederationSettings
from coordinator.local_network import LocalNetwork
from tests.conftest import ARTIFACTS, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def seed(tiny_moe_seed):
    """A short stage-1 dense seed cloned into experts (stage 2), and the corpus."""
    return tiny_moe_seed


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    net = LocalNetwork(
        tmp_path_factory.mktemp("net"), n_participants=2, preset="tiny", max_columns=4
    )
    with net:
        yield net


def step_until(loop, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        loop.step()


STAGE4_UNITS = 8


def test_dashboard_follows_a_real_stage4_run_which_ends_ternary_and_replays(
    seed, network, tmp_path, browser
):
    """The operator dashboard of a coordinator running a real tiny federated stage 4 (KD
    from the frozen teacher, progressive ternary experts, in-unit shared syncs: 6-step
    units leased as parts of 3) to the end of its token budget; the ternary schedule ends
    at 1.0 and a restarted coordinator replays every version."""
    from playwright.sync_api import expect

    cfg, corpus, ckpt = seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    url = coord.start_api()
    stop = threading.Event()
    thread = None
    try:
        settings = FederationSettings(
            stage=4, steps_per_unit=6, shared_sync_every=3, lease_seconds=30, eval_every=2,
            eval_batches=1, buffer_size=1, units_hint=60,
            # A version per result, up to 6 units in flight from a base a node may not have
            # refreshed (eager updates): 5 versions stale at intake on an idle machine, near
            # the default bound (8); the staleness bound has its own tests
            # (test_aggregation). Two loaded CI runs refused one part each: the second's
            # reason was NORM_OUT_OF_BOUNDS, a part of ternary fraction 0.5 trained after
            # its node's parts at fraction 1 were applied (test_stage4_phase_order); the
            # first's was not printed.
            max_staleness=16,
        )  # fmt: skip
        coord.prepare(ckpt, settings)
        driver = network.open_driver()
        tokens = STAGE4_UNITS * 6 * cfg.train.batch_size * cfg.train.seq_len
        loop = coord.federated_stage(driver, StageBudget(tokens=tokens), settings)
        thread = threading.Thread(target=loop.run, args=(stop.is_set,), daemon=True)
        thread.start()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url + "/")
        version = page.locator("#st-version")
        expect(version).to_have_text(re.compile(r"^v([2-9]|\d\d+)$"), timeout=240_000)
        points = "Number(document.querySelector('#chart-loss').dataset.points)"
        page.wait_for_function(f"{points} > 0", timeout=60_000)
        first = int(page.locator("#chart-loss").get_attribute("data-points"))
        page.wait_for_function(f"{points} > {first}", timeout=180_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "real-run-overview.png"))
        page.goto(url + "/participants")
        rows = page.locator("#participants-table tbody tr")
        expect(rows).to_have_count(2, timeout=30_000)
        expect(rows.first.locator("td").nth(2)).to_have_text("online")
        page.screenshot(path=str(ARTIFACTS / "real-run-participants.png"))
        page.close()
        thread.join(timeout=300)  # the stage ends by itself: its token budget
        assert not thread.is_alive(), "stage 4 did not finish its token budget"
        driver.close()
        _stage4_schedule_ran_to_ternary(coord, cfg)
        _scored_as_trained(loop)
        published = loop.state.published_model().state_dict()
        version = loop.state.version
    finally:
        stop.set()
        coord.shutdown()
    # Versions replay: a coordinator restarted on the work dir rebuilds the same weights.
    again = Coordinator(cfg, tmp_path / "coordinator", corpus)
    again.start()
    try:
        again.prepare(ckpt, settings)
        replay = again.federated_stage(None, StageBudget(tokens=tokens), settings)
        replay.recover()
        assert replay.state.version == version
        rebuilt = replay.state.published_model().state_dict()
        assert all(torch.equal(rebuilt[k], v) for k, v in published.items())
    finally:
        again.shutdown()


def _stage4_schedule_ran_to_ternary(coord, cfg) -> None:
    """Every stage-4 unit carried KD; the ternary fraction rose phase by phase to 1.0 by
    the end of the budget, and those units' results were accepted."""
    with _db(coord) as db:
        rows = db.execute(
            "select u.params, r.state, r.reject_reason, r.reject_detail from work_units u "
            "join results r on r.unit_id = u.unit_id order by json_extract(u.params, '$.position')"
        ).fetchall()
    params = [json.loads(p) for p, *_ in rows]
    refused = [(p["position"], reason, detail) for p, (_, state, reason, detail) in
               zip(params, rows, strict=True) if state != "accepted"]  # fmt: skip
    assert len(rows) >= STAGE4_UNITS and not refused, refused
    assert all(p["kd_weight"] == cfg.ternary.kd_weight > 0 for p in params)
    fractions = [p["ternary_fraction"] for p in params]
    assert fractions == sorted(fractions), fractions
    assert fractions[0] == cfg.ternary.schedule[0] and fractions[-1] == 1.0, fractions
    # In-unit shared syncs: parts held their columns, and the stage ended sending them.
    assert any(p.get("hold_columns") for p in params) and not params[-1].get("hold_columns")


def _scored_as_trained(loop) -> None:
    """Stage 4's published experts are ternary values (they travel as trits; the FP latents
    stay with the participants that train them), and its validation loss is that model's:
    with every expert weight ternary, as at the end of the schedule."""
    from coordinator.validation import column_val_loss
    from shared_model.ternary import is_ternary

    def score(fraction: float | None) -> float:
        model = loop.state.published_model()
        model.set_ternary_fraction(fraction)
        train = loop.state.cfg.train
        return column_val_loss(
            model, loop.val, loop.assignment, batch_size=train.batch_size,
            seq_len=train.seq_len, batches=loop.settings.eval_batches,
        )  # fmt: skip

    columns = [loop.state.columns.published(c) for c in loop.state.columns.masters]
    assert all(is_ternary(t) for column in columns for t in column.values())
    scored = loop.evaluate()
    assert scored == score(1.0) and abs(scored - score(None)) < 1e-4, (scored, score(None))


def _accepted(db_path) -> list[tuple[str, int | None]]:
    try:
        with sqlite3.connect(db_path) as db:
            return db.execute(
                "select unit_id, applied_in_version from results where state = 'accepted'"
            ).fetchall()
    except sqlite3.OperationalError:  # the coordinator is still creating its schema
        return []


def _serve(seed, network, work, *extra: str):
    _, _, ckpt = seed
    argv = [
        sys.executable, "-m", "shared_model.cli", "coordinator", "serve",
        "--superlink", network.superlink.address,
        "--superexec-secret-file", str(network.superlink.superexec_secret_file),
        "--init", str(ckpt), "--work-dir", str(work), "--preset", "tiny",
        "--minutes", "30", "--buffer-size", "1", "--steps-per-unit", "6",
        "--lease-seconds", "30", "--insecure",
    ]  # fmt: skip
    config = work.parent / "serve.yaml"
    config.write_text("train:\n  batch_size: 4\n  seq_len: 32\n")
    argv += ["--config", str(config), *extra]
    with open(work.parent / f"{work.name}.log", "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


KILLS = 5  # issue 16: "kill -9 the coordinator 5 times during a tiny run"


@pytest.fixture(scope="module")
def killed_serve(seed, network, tmp_path_factory):
    """A ``serve`` (with its REST API) kill -9'd ``KILLS`` times while it trains — each time
    once the restarted process leased new units, so units and results are in flight at every
    kill — and restarted on the same work dir; yields ``(proc, work, api)`` with the last
    one running and training. Shared by the stage-control test and the kill test (one serve
    start less): the first ends the stage by cancelling it, the second checks the log."""
    from shared_model.processes import free_port

    work = tmp_path_factory.mktemp("serve") / "coord"
    work.mkdir()
    db_path = work / "coordinator.db"
    port = free_port()
    proc = _serve(seed, network, work, "--api-port", str(port))
    t0 = time.monotonic()
    try:
        for _ in range(KILLS):
            last = _last_lease(db_path)
            wait_for(lambda t=last: _last_lease(db_path) != t, 300, "a new lease", 0.2)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            # Its Flower run is still "running" on the SuperLink: the restart owns it (same
            # work dir), stops it and starts a new one instead of refusing.
            proc = _serve(seed, network, work, "--api-port", str(port))
        before = len(_accepted(db_path))
        wait_for(lambda: len(_accepted(db_path)) >= before + 2, 300, "training to go on", 0.2)
        print(f"\n{KILLS} kills in {time.monotonic() - t0:.0f} s")
        yield proc, work, f"http://127.0.0.1:{port}/api/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _last_lease(db_path) -> str | None:
    try:
        with sqlite3.connect(db_path) as db:
            return db.execute("select max(leased_at) from work_units").fetchone()[0]
    except sqlite3.OperationalError:  # the coordinator is still creating its schema
        return None


def _outbox(participant) -> list[str]:
    from participant.outbox import ResultOutbox

    return [r.unit_id for r in ResultOutbox(participant.state_dir / "outbox").pending()]


def _participant_acks(network, units: set[str]) -> dict[str, dict]:
    """The acknowledgements the participants recorded for ``units`` (the last per unit)."""
    from participant.outbox import ResultOutbox

    acks = {}
    for p in network.participants:
        for ack in ResultOutbox(p.state_dir / "outbox").acks():
            if ack["unit_id"] in units:
                acks[ack["unit_id"]] = ack
    return acks


def _units(api: str) -> list[dict]:
    import httpx

    return httpx.get(f"{api}/units", params={"limit": 1000}, timeout=10).json()["items"]


def _stage_job(api: str) -> dict | None:
    import httpx

    items = httpx.get(f"{api}/stage-jobs", timeout=10).json()["items"]
    return items[0] if items else None


def test_operator_pauses_resumes_and_cancels_the_running_serve(killed_serve):
    """Stage control through the REST API: serve runs the stage as job ``stage3`` (the
    serve restarted after the kills of ``killed_serve``: the job survived them)."""
    import httpx

    proc, work, api = killed_serve
    try:
        wait_for(lambda: _ping(api), 120, "the REST API")
        job = wait_for(
            lambda: (j := _stage_job(api)) and j["progress"].get("version", 0) >= 1 and j,
            300, "stage job stage3 at version 1",
        )  # fmt: skip
        assert job["stage"] == "stage3" and job["state"] == "running"
        made = subprocess.run(
            [sys.executable, "-m", "shared_model.cli", "coordinator", "token", "create",
             "--db", f"sqlite:///{work / 'coordinator.db'}", "--name", "op", "--role",
             "operator"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        op = {"Authorization": f"Bearer {made.stdout.strip().splitlines()[-1]}"}
        paused = httpx.post(f"{api}/stage-jobs/{job['id']}/pause", headers=op, timeout=10)
        assert paused.status_code == 200, paused.text
        at = dt.datetime.fromisoformat(paused.json()["updated_at"])
        status = httpx.get(f"{api}/status", timeout=10).json()
        assert (status["stage"], status["stage_job_state"]) == ("stage3", "paused")
        # Units in flight finish (their results come back); nothing new is leased after
        # the loop's next poll of the job (1 s) and step.
        wait_for(lambda: not any(u["state"] == "leased" for u in _units(api)), 120,
                 "the units in flight to finish")  # fmt: skip
        units = _units(api)
        after = at + dt.timedelta(seconds=3)
        late = [u for u in units if u["leased_at"] and dt.datetime.fromisoformat(u["leased_at"])
                > after]  # fmt: skip
        assert late == [], late
        resumed = httpx.post(f"{api}/stage-jobs/{job['id']}/resume", headers=op, timeout=10)
        assert resumed.json()["state"] == "running"
        wait_for(lambda: len(_units(api)) > len(units), 120, "leasing to continue")
        cancelled = httpx.post(f"{api}/stage-jobs/{job['id']}/cancel", headers=op, timeout=10)
        assert cancelled.json()["state"] == "cancelled"
        assert proc.wait(timeout=120) == 0  # the stage ended cleanly; serve exits
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_coordinator_sigkill_and_restart_loses_nothing(killed_serve, network, tmp_path):
    """After ``KILLS`` kill -9s (``killed_serve``) and the end of the stage: every result a
    participant delivered and forgot was acknowledged after the coordinator's database
    decided it — accepted and applied exactly once, or refused with the reason the
    participant logged; none lost; versions contiguous; every version replays bit for bit
    from the published chain."""
    from coordinator.export import export_version

    proc, work, _ = killed_serve
    if proc.poll() is None:  # run alone: the stage-control test did not end the stage
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    db_path = work / "coordinator.db"
    with sqlite3.connect(db_path) as db:
        versions = [v for (v,) in db.execute("select version from model_versions order by version")]
        leased = {u for (u,) in db.execute("select unit_id from work_units")}
        rows = db.execute("select unit_id, state, reject_reason, applied_in_version from results")
        decided = {u: (state, reason, applied) for u, state, reason, applied in rows}
        refusals = {u for (u,) in db.execute("select unit_id from events where kind = "
                                            "'result.refused'")}  # fmt: skip
    assert versions == list(range(len(versions))) and len(versions) >= KILLS
    acks = _participant_acks(network, leased)
    assert acks, "no result was acknowledged to a participant"
    for unit, ack in acks.items():  # forgotten by the participant only once decided here
        if ack["accepted"]:
            state, _, applied = decided[unit]
            assert state == "accepted" and applied is not None, (unit, decided[unit])
        else:
            assert ack["reason"], ack
            assert unit in refusals or decided[unit][1] == ack["reason"], (unit, ack)
    # Every accepted result (acked or not yet) went into exactly one published version.
    assert all(a is not None for s, _, a in decided.values() if s == "accepted")
    # Replay: each version rebuilds from its checkpoint and the delta chain the restarted
    # coordinators published, every tensor verified against the digest published with it
    # (what a participant joining now does; a restart that recovered other weights than it
    # had published would break the next version's digests).
    for v in versions[1:]:
        assert export_version(work_dir=work, db_url=None, version=v, out=tmp_path / f"v{v}")
    # What the participants still hold is not lost: they re-send it and the coordinator
    # answers "already decided". (The end-of-stage ack round is bounded, so a result
    # decided in its last seconds may still be held.)
    held = [u for p in network.participants for u in _outbox(p) if u in leased]
    print(f"{len(held)} held by participants ({sum(u in decided for u in held)} decided)")
    print(
        f"{len(acks)} results acked ({sum(not a['accepted'] for a in acks.values())} refused),"
        f" {len(decided)} decided, {len(versions)} versions"
    )


def _ping(api: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{api}/status", timeout=5).is_success
    except httpx.HTTPError:
        return False


def test_train_and_survive_a_killed_participant(seed, network, tmp_path):
    cfg, corpus, ckpt = seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    try:
        # No momentum (the default outer lr, 1.5): the check below is that training goes
        # on around a killed participant. With outer momentum the first versions after the seed
        # overshoot (the re-warmed lr's bump, docs/federated-training.md §5.1); that is
        # measured in the benchmark.
        settings = FederationSettings(
            stage=3, steps_per_unit=8, lease_seconds=15, eval_every=1000, eval_batches=4,
            buffer_size=2, units_hint=60, outer_momentum=0.0,
        )  # fmt: skip
        coord.prepare(ckpt, settings)
        driver = network.open_driver()
        loop = coord.federated_stage(driver, StageBudget(minutes=30), settings)
        loss0 = loop.evaluate()

        # Not version 5: versions 3-7 sit on a plateau (the inner lr reaches its peak there,
        # 20 warm-up steps into a seed of 40), measured 0.03 below the seed at worst here and
        # once above it in CI; by version 12 every run measured was 0.28-0.39 below. And
        # both nodes in them: column mode, so versions of one node's columns alone train the
        # shared layers on half the documents (CI once: a node lost its first unit to a
        # Flower task of the previous run and three to the previous network's replica; the
        # other's twelve versions alone ended 0.13 above the seed).
        def both_in(n: int) -> bool:
            nodes = sorted(driver.node_ids())
            applied = _applied_results(coord, nodes)
            return loop.state.version >= 12 and len(nodes) == 2 and min(applied) >= n

        step_until(loop, lambda: both_in(4), 300, "12 versions, 4 results of each node in them")
        loss12 = loop.evaluate()
        assert loss12 < loss0, (loss0, loss12)
        nodes = sorted(driver.node_ids())
        assert len(nodes) == 2

        # Kill participant 1 while both hold leases: the victim's units must be taken back and
        # redone by the survivor (whose own leases are never re-issued). They come back by
        # one of two roads, whichever is first: the lease expires, or Flower reports the
        # node's messages undeliverable (the units fail and are re-queued at once).
        # Both must hold leases at the moment of the kill; a node between two units holds
        # none for an instant, so wait for that moment rather than assert on any instant.
        def both_hold() -> bool:
            return all(_leased_units(coord, node) for node in nodes)

        step_until(loop, both_hold, 120, "both participants to hold leases")
        # Units lost before the kill do not count: on a loaded machine a SuperNode slow to
        # start leaves its first message unpulled past its 15-s TTL (both nodes did so once).
        lost_before = {n: _lost_units(coord, n) for n in nodes}
        killed_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)  # as the events store it
        network.kill_participant(1)

        def lost_since(n: int) -> set[str]:
            return _lost_units(coord, n) - lost_before[n]

        # Any of the victim's leases counts, not only those held at the kill: a result it
        # sent just before dying can still be accepted (its unit is then not redone), and
        # until Flower marks the node offline the loop may lease it more, which are lost too.
        def redone() -> bool:
            return any(_redone_by_other(coord, lost_since(n), n) for n in nodes)

        step_until(loop, redone, 300, "a lost unit re-issued and done by the other participant")
        (victim,) = [n for n in nodes if lost_since(n)]
        _no_new_leases_once_lost(coord, victim, killed_at)
        driver.close()
    finally:
        coord.shutdown()


def _no_new_leases_once_lost(coord, node_id, killed_at: dt.datetime) -> None:
    """Once a unit of the dead node was lost after ``killed_at`` (its lease expired, or
    Flower reported its message undeliverable), the loop leased it nothing more for the
    hold-back period (Flower lists a dead node for up to a minute), and said why it held
    the node back."""
    from coordinator.node_status import NODE_COOLDOWN_S

    signed = _stored(node_id)
    with _db(coord) as db:
        (pid,) = db.execute("select id from participants where node_id = ?", (signed,)).fetchone()
        rows = db.execute(
            "select kind, ts from events where participant_id = ? and kind in "
            "('lease.expired', 'unit.failed', 'lease.created') order by id",
            (pid,),
        ).fetchall()
        held = db.execute(
            "select count(*) from events where ((kind = 'participant.held_back' and message like"
            " ?) or (kind = 'participant.offline' and participant_id = ?)) and ts > ?",
            (f"node {node_id}:%", pid, killed_at.isoformat(sep=" ")),
        ).fetchone()[0]
    stamps = [(kind, dt.datetime.fromisoformat(ts)) for kind, ts in rows]
    first = min(t for kind, t in stamps if kind != "lease.created" and t > killed_at)
    window = dt.timedelta(seconds=NODE_COOLDOWN_S)
    later = [t for kind, t in stamps if kind == "lease.created" and first < t < first + window]
    assert not later, (first, later)
    assert held >= 1


def _applied_results(coord, nodes: list[int]) -> list[int]:
    """How many results of each of ``nodes`` published versions applied."""
    with _db(coord) as db:
        return [
            db.execute(
                "select count(*) from results r join participants p on p.id = r.participant_id"
                " where p.node_id = ? and r.applied_in_version is not null",
                (_stored(n),),
            ).fetchone()[0]
            for n in nodes
        ]


def _lost_units(coord, node_id) -> set[str]:
    """Units leased to ``node_id`` and taken back: expired, or failed by Flower's error."""
    return _leased_units(coord, node_id, "expired") | _leased_units(coord, node_id, "failed")


def _stored(node_id: int) -> int:
    """A Flower node id as the coordinator's database stores it (``UInt64``)."""
    return UInt64().process_bind_param(node_id, None)


def _db(coord):
    return sqlite3.connect(coord.work_dir / "coordinator.db")


def _leased_units(coord, node_id, state: str = "leased") -> set[str]:
    """Units leased to ``node_id`` that are now in ``state`` (``expired``: each has a
    re-queued copy)."""
    signed = _stored(node_id)
    with _db(coord) as db:
        rows = db.execute(
            "select u.unit_id from work_units u join participants p on p.id = u.participant_id "
            "where p.node_id = ? and u.state = ?",
            (signed, state),
        ).fetchall()
    return {r[0] for r in rows}


def _redone_by_other(coord, units, victim) -> bool:
    if not units:
        return False
    signed = _stored(victim)
    marks = ",".join("?" * len(units))
    with _db(coord) as db:
        rows = db.execute(
            "select u.unit_id from work_units u join participants p on p.id = u.participant_id "
            f"where u.reissued_from in ({marks}) and u.state = 'done' and p.node_id != ?",
            (*units, signed),
        ).fetchall()
    return bool(rows)
