"""Hostile results that pass every format check, through the real loop's intake.

Honest units are trained by the participant's own trainer (:func:`lease_and_train`), then
rewritten as an attacker would (:func:`benchmarks.byzantine_bench.poison`: re-encoded and
uploaded under the attacker's own lease), so only the defences can stop them: the
per-tensor update bounds, the column's held-out loss check, the robust shared mean and
the quarantine of participants whose results keep failing.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from sqlalchemy import select

from benchmarks.byzantine_bench import AttackDriver, poison
from benchmarks.federation_replay import ReplayDriver
from coordinator.aggregation.bounds import OutOfBounds, UpdateBounds
from coordinator.aggregation.robust import coordinate_median, robust_reducer
from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db.models import Event, Participant, Result
from coordinator.federation_settings import FederationSettings
from tests.test_federation_intake import NODE, corpus, lease_and_train, make_loop

__all__ = ["corpus"]  # the module fixture, shared with test_federation_intake


def test_bounds_refuse_a_tensor_against_its_own_norm_and_the_recent_median():
    bounds = UpdateBounds(max_ratio=0.5, tolerance=4.0, window=16, min_history=8)
    weight = {"layers.0.ffn.experts.3.w1.weight": torch.ones(4, 4)}  # norm 4
    honest = {"layers.0.ffn.experts.3.w1.weight": torch.full((4, 4), 0.01)}  # ratio 0.01
    with pytest.raises(OutOfBounds, match="max_update_ratio"):
        bounds.check("column", {k: v * 60 for k, v in honest.items()}, weight)  # ratio 0.6
    assert bounds.check("column", {k: v * 10 for k, v in honest.items()}, weight)  # no history
    other = "layers.0.ffn.experts.5.w1.weight"  # the same weight of another column
    weight_5 = torch.ones(4, 4)
    for _ in range(8):  # column 5's updates set the bar of column 3 as well
        ratios = bounds.check("column", {other: torch.full((4, 4), 0.01)}, {other: weight_5})
        bounds.record(ratios)
    with pytest.raises(OutOfBounds, match="median of the last 8 updates"):
        bounds.check("column", {k: v * 10 for k, v in honest.items()}, weight)
    assert math.isclose(
        bounds.bar("column", "layers.0.ffn.experts.3.w1.weight"), 0.04, rel_tol=1e-6
    )


def test_the_relative_bound_follows_the_lr_warm_up_and_unit_length():
    """Updates grow with the unit's lr: a history of warm-up units (lr 10× below the peak)
    must not refuse honest units at the peak (on ``small`` it once did, and quarantined
    every honest participant of the demo). After the peak the bar stays (updates carrying
    error feedback shrink more slowly than the lr). And a history that has gone stale moves:
    updates refused by the relative rule alone enter it."""
    bounds = UpdateBounds(max_ratio=0.5, tolerance=4.0, window=16, min_history=8)
    name = "layers.1.ffn_norm.weight"
    weight = {name: torch.ones(16)}  # norm 4
    for _ in range(8):  # warm-up: lr 1e-4, ratio 0.001
        step = bounds.step_size(1e-4, 9)
        bounds.record(bounds.check("shared", {name: torch.full((16,), 0.001)}, weight, step))
    at_peak = {name: torch.full((16,), 0.007)}  # lr 1e-3: 7 × the warm-up ratio
    assert bounds.check("shared", at_peak, weight, bounds.step_size(1e-3, 9))
    # Decay: lr 1e-4 again, the update still large: measured against the peak, accepted.
    assert bounds.check("shared", at_peak, weight, bounds.step_size(1e-4, 9))
    assert math.isclose(bounds.bar("shared", name, bounds.step_size(1e-4, 9)), 0.04, rel_tol=1e-6)
    # Four times as many steps: twice the bar, not four times.
    assert math.isclose(bounds.bar("shared", name, bounds.step_size(1e-4, 36)), 0.08, rel_tol=1e-6)
    # 5 × the bar is refused, but a run of such updates moves the median: then accepted.
    big = {name: torch.full((16,), 0.05)}
    step = bounds.step_size(1e-3, 9)
    refused = 0
    for _ in range(12):
        try:
            bounds.record(bounds.check("shared", big, weight, step))
        except OutOfBounds as exc:
            assert "per step size" in str(exc)
            refused += 1
    assert 0 < refused < 12


def test_robust_means_keep_a_sign_flipped_update_from_reversing_the_step():
    torch.manual_seed(0)
    honest = torch.randn(4096) * 0.1 + 0.05
    stack = torch.stack([honest + 0.02 * torch.randn(4096) for _ in range(2)] + [-50 * honest])
    ones = torch.ones(3)
    plain = robust_reducer("mean", trim=0, clip_factor=1.0)(stack, ones)
    assert float(plain @ honest) < 0  # the attacker reverses the plain mean
    for name in ("centered_clip", "median"):
        robust = robust_reducer(name, trim=1, clip_factor=1.0)(stack, ones)
        assert float(robust @ honest) / float(honest @ honest) > 0.3, name
    even = torch.tensor([[1.0], [3.0]])
    assert coordinate_median(even).item() == 2.0  # not torch.median's lower value


def test_a_x1000_update_is_refused_with_its_reason_and_changes_nothing(tmp_path, corpus):
    attack, reason = "x1000", "NORM_OUT_OF_BOUNDS"
    loop, train = make_loop(tmp_path, corpus)
    _, honest = lease_and_train(loop, train, tmp_path)
    assert loop.receive(NODE, honest).accepted  # the same participant's honest unit passes
    _, result = lease_and_train(loop, train, tmp_path)
    poison(result, attack, loop.state, loop.intake.bounds)
    columns = {
        c: {k: v.clone() for k, v in m.items()} for c, m in loop.state.columns.masters.items()
    }
    outcome = loop.receive(NODE, result)
    assert not outcome.accepted and outcome.reason == reason, outcome
    for c, master in loop.state.columns.masters.items():
        assert all(torch.equal(columns[c][k], v) for k, v in master.items())
    with loop.factory() as s:
        row = s.query(Result).filter_by(unit_id=result.unit_id).one()
    assert row.reject_reason == reason and "max_update_ratio" in row.reject_detail


def test_a_node_whose_results_keep_failing_is_quarantined_and_gets_no_units(tmp_path, corpus):
    loop, train = make_loop(tmp_path, corpus, quarantine_after=2, reputation_window=4)
    loop.driver = ReplayDriver(loop.state.cfg, loop.state.store, train, tmp_path / "n", [1.0])
    for i in range(2):
        _, result = lease_and_train(loop, train, tmp_path / f"u{i}")
        poison(result, "x1000", loop.state, loop.intake.bounds)
        assert not loop.receive(NODE, result).accepted
    loop.driver.nodes = {NODE: loop.driver.nodes.pop(1)}  # the replay node speaks as NODE
    with loop.factory() as s:
        leased_before = s.query(Result).count()
    loop.step(wait=0)
    assert not loop.driver.pending  # no unit was pushed to the quarantined node
    with loop.factory() as s:
        events = [e.message for e in s.query(Event).filter_by(kind="participant.quarantined")]
        assert s.query(Result).count() == leased_before
    assert len(events) == 1 and "2 of its last 2 results refused (NORM_OUT_OF_BOUNDS)" in events[0]


def test_quarantine_never_takes_the_whole_network(tmp_path, corpus):
    """Three nodes whose results all keep failing: two are quarantined, the last keeps
    getting units, and the operator is told the defences are the likelier culprit."""
    loop, train = make_loop(tmp_path, corpus, quarantine_after=2, reputation_window=4)
    nodes = [NODE, NODE + 1, NODE + 2]
    for node in nodes:
        for i in range(2):
            _, result = lease_and_train(loop, train, tmp_path / f"n{node}-{i}", node=node)
            poison(result, "x1000", loop.state, loop.intake.bounds)
            assert not loop.receive(node, result).accepted
    driver = ReplayDriver(loop.state.cfg, loop.state.store, train, tmp_path / "n", [1.0] * 3)
    driver.nodes = dict(zip(nodes, driver.nodes.values(), strict=True))  # they speak as these
    loop.driver = driver
    loop.step(wait=0)
    loop.step(wait=0)  # the decision holds: nobody released, nobody else leased
    assert set(loop.driver.pending.values()) == {nodes[-1]}
    with loop.factory() as s:
        kinds = [e.kind for e in s.query(Event).order_by(Event.id)]
    assert kinds.count("participant.quarantined") == 2 and "participant.released" not in kinds
    assert kinds.count("defence.quarantine_suspended") == 1


@pytest.mark.slow  # a real 12-unit federated run: 133 s on the shared 2-core machine
def test_an_attacker_in_the_fleet_is_refused_and_quarantined_and_honest_nodes_are_not(
    tiny_moe_seed, tmp_path
):
    """The real loop with 3 in-process participants, one of them hostile (a sign flip
    scaled to just under the bounds, then ×1000, in turn), the defaults' defences: every
    hostile result is refused, the attacker is quarantined after ``quarantine_after``
    strikes and gets no 4th unit, and no honest result is refused. (A sign flip at normal
    scale is not refused on ``tiny``; the robust shared mean bounds its effect:
    ``benchmarks/results/byzantine_bench.json``.)"""
    cfg, corpus, ckpt = tiny_moe_seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    try:
        settings = FederationSettings(
            stage=3, steps_per_unit=5, buffer_size=3, eval_every=1000, max_in_flight=1
        )
        coord.prepare(ckpt, settings)
        train = corpus.dataset("train")
        attack = "sign_flip_bound,x1000"
        driver = AttackDriver(cfg, coord.store, train, tmp_path / "nodes", [1.0, 1.0, 1.0],
                              attackers={3}, attack=attack, coordinator=coord)  # fmt: skip
        tokens = 12 * 5 * cfg.train.batch_size * cfg.train.seq_len  # 4 units each
        loop = coord.federated_stage(driver, StageBudget(tokens=tokens), settings)
        loop.run(lambda: False)
        checked = loop.intake.validator.checked
        with coord.session_factory() as s:
            rows = s.execute(
                select(Participant.node_id, Result.state, Result.reject_reason, Result.unit_id)
                .join(Participant, Participant.id == Result.participant_id)
            ).all()  # fmt: skip
            quarantined = s.query(Event).filter_by(kind="participant.quarantined").count()
    finally:
        coord.shutdown()
    hostile = {r.unit_id: r for r in rows if r.node_id == 3}
    honest = [r for r in rows if r.node_id != 3]
    assert {a for _, a in driver.sent} == {"sign_flip_bound", "x1000"}
    refused = [hostile[u].state == "rejected" for u, _ in driver.sent]
    assert all(refused), (driver.sent, hostile, checked)
    assert quarantined == 1 and len(driver.sent) == settings.quarantine_after
    assert honest and all(r.state == "accepted" for r in honest), honest


def test_a_restarted_coordinator_keeps_its_update_bounds(tmp_path, corpus):
    """The relative bound's history and peak lr go into the state file at every state
    checkpoint, and the loop a restarted coordinator builds on that state goes on with the
    same bars: a restart (a kill -9 included) reopens no window in which rule 1 alone holds."""
    from coordinator.aggregation.bounds import MIN_HISTORY
    from coordinator.federation import FederationLoop
    from coordinator.publishing import CoordinatorState
    from shared_model.model import PerspectiveModel

    path = tmp_path / "state.safetensors"
    loop, train = make_loop(tmp_path, corpus, checkpoint_every=1, state_path=path)
    loop.state.shared.buffer_size = 1  # a version (and a state checkpoint) per result
    for i in range(MIN_HISTORY + 1):
        _, result = lease_and_train(loop, train, tmp_path / f"u{i}")
        assert loop.receive(NODE, result).accepted
    before = loop.intake.bounds
    name = next(iter(loop.state.shared.master))
    peak = before.state_dict()["peak_lr"]
    step = peak * math.sqrt(3)  # a unit of 3 steps at the peak lr so far
    assert peak > 0
    assert before.bar("shared", name, step) < before.max_ratio  # rule 2 holds

    cfg = loop.state.cfg
    state = CoordinatorState(cfg, PerspectiveModel(cfg, moe=True), loop.state.store, loop.settings)
    state.load(path)  # what ``Coordinator.prepare`` does on a restart
    restarted = FederationLoop(
        state, loop.settings, loop.factory, None, loop.units, loop.val, loop.assignment,
        lambda s: 0.0,
    )  # fmt: skip
    after = restarted.intake.bounds
    assert after.history() == before.history()
    assert after.bar("shared", name, step) == before.bar("shared", name, step)
    assert after.state_dict()["peak_lr"] == peak
    # Another stage's loop on the same state starts afresh (its updates have other sizes).
    stage4 = FederationLoop(
        state, replace(loop.settings, stage=4), loop.factory, None, loop.units, loop.val,
        loop.assignment, lambda s: 0.0,
    )  # fmt: skip
    assert stage4.intake.bounds.history() == {}
