"""A participant's stage-4 unit trains its experts through the ternariser the unit names.

The real :class:`UnitTrainer` on units leased by the in-process federation loop of
test_federation_intake.py (no transport), turned into stage-4 units whose frozen teacher
is the unit's own base checkpoint. Over Flower, test_federation_flower.py checks the
coordinator's side (every unit carries KD and the fraction rises to 1.0); this checks that
the participant obeys the fraction it is sent.
"""

from __future__ import annotations

import torch

from coordinator.db import participants as db_participants
from coordinator.plan.params import count_params
from coordinator.plan.participant_host import estimate_participant_host
from participant.unit_trainer import UnitTrainer
from shared_model.stage_loss import TEACHER_DTYPE, teacher_run_dtype
from shared_model.wire.perspective.v1 import federation_pb2
from tests.test_federation_intake import NODE, corpus, local_io, make_loop  # noqa: F401

torch.set_num_threads(1)


def _stage4_request(loop, fraction: float):
    """A leased unit, re-labelled stage 4 with ``fraction`` and its base as teacher."""
    with loop.factory.begin() as s:
        p = db_participants.touch_participant(
            s, node_id=NODE, capability=db_participants.Capability(max_columns=2)
        )
        unit = loop.units.lease(s, p, loop.state)
        req = loop.units.request(unit, loop.state, NODE)
    req.unit.stage = federation_pb2.STAGE_TERNARY_DISTILLATION
    req.unit.ternary_fraction = fraction
    req.unit.kd_weight = loop.state.cfg.ternary.kd_weight
    req.teacher.CopyFrom(req.checkpoint)
    return req


def _column_deltas(loop, train, req, work) -> dict[int, bytes]:
    trainer = UnitTrainer(loop.state.cfg, train, work)
    store = loop.state.store
    result = trainer.run(req, local_io(store, req.unit.unit_id))
    assert result.train_loss > 0 and len(result.column_deltas) > 0
    return {d.column: store.get(d.delta.content_id) for d in result.column_deltas}


def test_stage4_unit_trains_through_the_ternary_fraction_it_is_sent(tmp_path, corpus):  # noqa: F811
    loop, train = make_loop(tmp_path, corpus)
    req = _stage4_request(loop, 0.25)
    quarter = _column_deltas(loop, train, req, tmp_path / "a")
    # Same unit, same participant state: training is deterministic ...
    assert _column_deltas(loop, train, req, tmp_path / "b") == quarter
    # ... so a different fraction can only change the deltas through the ternariser.
    req.unit.ternary_fraction = 1.0
    full = _column_deltas(loop, train, req, tmp_path / "c")
    assert full.keys() == quarter.keys()
    assert all(full[c] != quarter[c] for c in full), "the ternary fraction changed nothing"


def test_a_stage4_unit_distils_from_the_boundary_in_bf16_as_the_planner_counts(
    tmp_path,
    corpus,  # noqa: F811
):
    """The teacher a participant builds is the boundary's published weights rounded to
    ``TEACHER_DTYPE`` (bf16), in its replica and in the model it runs (on a CPU in FP32,
    the same values); ``perspective plan``'s participant host RAM counts those bytes."""
    loop, train = make_loop(tmp_path, corpus)
    req = _stage4_request(loop, 0.5)
    trainer = UnitTrainer(loop.state.cfg, train, tmp_path / "node")
    trainer.run(req, local_io(loop.state.store, req.unit.unit_id))
    teacher, held = trainer.teacher_replica, sorted(trainer.replica.columns)
    published = loop.state.published_model().state_dict()
    assert teacher.version == req.unit.base_version and sorted(teacher.columns) == held
    for name, value in teacher.shared.items():
        assert value.dtype == TEACHER_DTYPE
        assert torch.equal(value, published[name].to(TEACHER_DTYPE)), name
    for c in held:  # a column's expert tensors, as the model names them
        own = loop.state.published_model().expert_state(c)
        assert all(torch.equal(v, own[k].to(TEACHER_DTYPE)) for k, v in teacher.columns[c].items())
    model = trainer._teacher[1]  # those weights, run in FP32 on a CPU (bf16 is slow there)
    assert {p.dtype for p in model.parameters()} == {teacher_run_dtype("cpu")} == {torch.float32}
    assert teacher_run_dtype("cuda:0") == TEACHER_DTYPE  # a GPU runs it in bf16
    weights = {**teacher.shared, **{k: v for c in held for k, v in teacher.columns[c].items()}}
    assert all(torch.equal(v, weights[k].float()) for k, v in model.state_dict().items()), "exact"
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    plan = estimate_participant_host(count_params(loop.state.cfg), stage=4, columns=len(held))
    nbytes = sum(
        t.numel() * t.element_size()
        for state in (teacher.shared, *teacher.columns.values())
        for t in state.values()
    )
    assert plan.teacher == nbytes
