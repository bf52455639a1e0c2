"""A federated stage starts with every node's slots free: no lease of the stage before
(whose results it would refuse) counts as a unit in flight.

Found in CI (``test_demo``): after its Flower run was stopped, one SuperNode pushed every
reply one message late (a Flower 1.42 race), so its answer to stage 3's last ``collect``
(the units it dropped) never arrived; its stage-3 lease stayed open, the stage-4 loop saw
the node's slots full and leased it nothing for the whole stage.
"""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import select

from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db import participants as db_participants
from coordinator.db.leases import get_unit
from coordinator.db.models import WorkUnit
from coordinator.db.types import UnitState
from coordinator.federation_settings import FederationSettings
from coordinator.leasing import leases_needed

SETTINGS = FederationSettings(stage=3, steps_per_unit=3, buffer_size=1, max_in_flight=2)


def test_a_lease_of_the_stage_before_does_not_hold_a_node_back(tiny_moe_seed, tmp_path):
    cfg, corpus, ckpt = tiny_moe_seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    try:
        coord.prepare(ckpt, SETTINGS)
        stage3 = coord.federated_stage(None, StageBudget(minutes=30), SETTINGS)
        with stage3.factory.begin() as s:
            node = db_participants.touch_participant(s, node_id=7)
            left = stage3.units.lease(s, node, stage3.state).unit_id  # never answered
            assert leases_needed(s, node_id=7, max_in_flight=2) == 1
        stage3.publish()  # the boundary's version: stage 4's teacher
        stage4 = coord.federated_stage(None, StageBudget(minutes=30), replace(SETTINGS, stage=4))
        with stage4.factory() as s:
            assert leases_needed(s, node_id=7, max_in_flight=2) == 2  # every slot free
            unit = get_unit(s, unit_id=left)
            assert unit.state == UnitState.FAILED and "stage ended" in unit.state_reason
            (copy,) = s.scalars(select(WorkUnit).where(WorkUnit.reissued_from == left)).all()
            # Queued for its own stage, not redone in this one; its node may take it back.
            assert (copy.stage, copy.state, copy.excluded_participants) == (
                "stage3", UnitState.QUEUED, [],
            )  # fmt: skip
        leased = stage4.lease_request(7)
        assert leased is not None and leased[1].unit.stage == 4  # ternary distillation
    finally:
        coord.shutdown()
