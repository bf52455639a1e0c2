"""An FP column update that arrives after stage 4's experts went ternary is not applied.

A node trains its units in the order their Flower messages reach it, not the order they
were leased in: in a loaded ``make test`` run, a node trained its part at ternary fraction
0.5 after its parts at fraction 1 had been applied. Its column delta was then its FP
latent minus the published ternary values, 0.22 x the column's norm, refused as
``NORM_OUT_OF_BOUNDS``. Now the intake applies that result's shared update and leaves its
columns' training on the node, where the node's next unit of them sends it as trits.

Real pieces: the coordinator's stage-4 loop as ``serve`` and ``demo`` build it (leasing,
intake, publishing, the teacher checkpoint) and the participant's own
:class:`~participant.unit_trainer.UnitTrainer`, on the coordinator's blob store.
"""

from __future__ import annotations

import torch

from coordinator.db.models import Event
from coordinator.federation_settings import FederationSettings
from coordinator.intake import fp_columns_outlived
from participant.unit_trainer import UnitTrainer
from shared_model.ternary import is_ternary
from tests.test_in_unit_sync import _io as head_io
from tests.test_network_change import lease_unit, network_loop

#: 4 units of 3 steps: one per ternary phase (0.25, 0.5, 0.75, 1.0)
STAGE4 = FederationSettings(
    stage=4, steps_per_unit=3, units_hint=4, buffer_size=1, eval_every=1000, max_in_flight=4
)


def test_fp_columns_trained_after_the_experts_went_ternary_are_not_applied(tiny_moe_seed, tmp_path):
    cfg, corpus, _ = tiny_moe_seed
    coord, loop = network_loop(tiny_moe_seed, tmp_path / "coordinator", STAGE4)
    try:
        node = UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "node")
        units = [lease_unit(loop, 1) for _ in range(4)]
        assert [u.unit.ternary_fraction for u in units] == [0.25, 0.5, 0.75, 1.0]
        assert [u.column_codec for u in units] == ["sparse"] * 3 + ["trits"]

        def train(req):  # from the newest version (the blob service's Head), as over Flower
            return node.run(req, head_io(loop, req))

        assert loop.receive(1, train(units[3])).accepted  # fraction 1 first: trits
        assert loop.state.publisher.column_codec == "trits"
        columns = list(units[1].unit.columns)
        before = {c: dict(loop.state.columns.published(c)) for c in columns}
        assert all(is_ternary(v) for s in before.values() for v in s.values())
        shared = {k: v.clone() for k, v in loop.state.shared.published.items()}

        late = train(units[1])  # fraction 0.5, trained after: FP latent − ternary values
        assert late.column_deltas and late.base_version == loop.state.version
        assert loop.receive(1, late).accepted
        # Its shared update is applied; its columns are not, and stay ternary.
        assert any(not torch.equal(shared[k], v) for k, v in loop.state.shared.published.items())
        for c in columns:
            after = loop.state.columns.published(c)
            assert all(torch.equal(before[c][k], v) for k, v in after.items())
        with loop.factory() as s:
            events = [e.message for e in s.query(Event).filter_by(kind="result.columns_outlived")]
        assert len(events) == 1 and units[1].unit.unit_id in events[0]
        # The node still holds that training: its FP latent, not the published trits.
        assert not all(is_ternary(v) for v in node.local.columns[columns[0]].values())
        # Only stage 4 leaves them out: a stage-3 loop on this state forgets the teacher.
        assert fp_columns_outlived(loop.state, "sparse")
        loop.state.publisher.teacher = None
        assert not fp_columns_outlived(loop.state, "sparse")
    finally:
        coord.shutdown()
