"""Eager updates: a unit starts from its node's own results still on their way.

Over a real network a participant starts its next unit while its last result is encoded
and sent, so that unit cannot start from a version that applies it. With
``eager_updates`` the coordinator asks each unit to start from the synced shared layers
minus ``eager_scale`` × every shared pseudo-gradient of its node that the synced versions
do not list yet (``VersionManifest.units``); a result the versions apply is never added
again.

Real pieces: the coordinator's loop (leasing, intake, publishing) and the participant's
own :class:`~participant.unit_trainer.UnitTrainer`, on the coordinator's blob store.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from coordinator.blob_uploads import UploadLedger
from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db.stats import result_staleness
from coordinator.federation_settings import FederationSettings, FederationSettingsError
from coordinator.plan.params import count_params
from coordinator.plan.participant_host import estimate_participant_host
from participant.unit_trainer import CORRECTION_DTYPE, BlobIO, UnitTrainer
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2
from tests.test_network_change import lease_unit

SETTINGS = FederationSettings(
    stage=3, steps_per_unit=3, buffer_size=1, eval_every=1000, max_in_flight=3,
    eager_updates=1.5, outer_lr=0.8,
)  # fmt: skip


@pytest.fixture
def loop(tiny_moe_seed, tmp_path):
    cfg, corpus, ckpt = tiny_moe_seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    coord.prepare(ckpt, SETTINGS)
    yield coord.federated_stage(None, StageBudget(minutes=30), SETTINGS)
    coord.shutdown()


@pytest.fixture
def trainer(tiny_moe_seed, tmp_path):
    """The participant's own trainer, on the training documents."""
    cfg, corpus, _ = tiny_moe_seed
    return UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "node")


def _lease(loop, node_id: int = 1) -> control_pb2.ControlRequest:
    return lease_unit(loop, node_id)


def _io(loop) -> BlobIO:
    store, uploads = loop.state.store, UploadLedger.for_store(loop.state.store)

    def upload(data: bytes, unit_id: str) -> tensor_pb2.BlobRef:
        content_id = store.put_bytes(data)
        uploads.record(content_id, unit_id)  # as the blob service's Put
        return tensor_pb2.BlobRef(content_id=content_id, size=len(data))

    return BlobIO(fetch=lambda ref: store.get(ref.content_id), upload=upload)


def _run(trainer, loop, req):
    """Train ``req``; returns the trained unit (its start state) and its encoded result."""
    io = _io(loop)
    io.upload = lambda data, unit_id=req.unit.unit_id, up=io.upload: up(data, unit_id)
    trained = trainer.train(req, io)
    return trained, trained.encode()


def _progress(trained) -> dict[str, torch.Tensor]:
    """What the unit's shared layers moved: its start minus its end, as the node keeps it
    while the result travels (in bf16: a correction, not a replica)."""
    c = trained.capture
    moved = {k: start - c.shared[k] for k, start in c.published_shared.items()}
    return {k: v.to(CORRECTION_DTYPE).float() for k, v in moved.items()}


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_a_unit_starts_from_its_nodes_results_not_applied_yet(loop, trainer):
    first, second = _lease(loop), _lease(loop)
    scale = SETTINGS.eager_updates * SETTINGS.outer_lr / SETTINGS.buffer_size
    assert first.eager_scale == pytest.approx(scale)
    assert first.max_staleness == SETTINGS.max_staleness
    a, result_a = _run(trainer, loop, first)
    published_v0 = dict(trainer.replica.shared)
    assert _close(a.capture.published_shared, published_v0)  # nothing on its way yet
    assert result_a.timings.eager_results == 0
    # `second` starts while `first`'s result travels: from version 0 minus its share.
    b, result_b = _run(trainer, loop, second)
    assert trainer.replica.version == 0
    step_a = _progress(a)
    expected = {k: v - scale * step_a[k] for k, v in published_v0.items()}
    assert _close(b.capture.published_shared, expected)
    assert result_b.timings.eager_results == 1  # reported: the coordinator counts them
    # The coordinator applies `first` (a version per result): version 1 lists it.
    assert loop.receive(1, result_a).accepted and loop.state.version == 1
    manifest = control_pb2.VersionManifest.FromString(
        loop.state.store.get(loop.state.publisher.manifests[1].content_id)
    )
    assert list(manifest.units) == [first.unit.unit_id]
    # The next unit syncs to version 1: `first` is in it and is not added again;
    # `second` is still on its way.
    c, result_c = _run(trainer, loop, _lease(loop))
    assert trainer.replica.version == 1
    step_b = _progress(b)
    expected = {k: v - scale * step_b[k] for k, v in trainer.replica.shared.items()}
    assert _close(c.capture.published_shared, expected) and result_c.timings.eager_results == 1
    assert loop.receive(1, result_b).accepted
    with loop.factory() as s:
        assert result_staleness(s, stage="stage3")["eager"] == 0.5  # b of a and b


@pytest.mark.parametrize("max_staleness, kept", [(0, 0), (1, 1)])
def test_a_result_too_stale_to_be_accepted_is_forgotten(loop, trainer, max_staleness, kept):
    """The coordinator's ``max_staleness`` travels with each unit: a result of ours whose
    base is further behind the synced version than that would be refused, so the next
    unit does not start from it."""
    first, second = _lease(loop), _lease(loop)
    _, result_a = _run(trainer, loop, first)
    _, result_b = _run(trainer, loop, second)
    assert loop.receive(1, result_b).accepted and loop.state.version == 1  # b, not a
    third = _lease(loop)
    third.max_staleness = max_staleness
    _, result_c = _run(trainer, loop, third)
    assert trainer.replica.version == 1  # a (base 0) is one version behind it
    assert result_c.timings.eager_results == kept


def test_eager_updates_off_starts_from_the_synced_version(loop, trainer):
    req = _lease(loop)
    req.eager_scale = 0.0
    _run(trainer, loop, req)
    again = _lease(loop)
    again.eager_scale = 0.0
    trained, _ = _run(trainer, loop, again)
    assert _close(trained.capture.published_shared, trainer.replica.shared)


def test_the_staleness_grace_reaches_the_state_serve_and_demo_build(tiny_moe_seed, tmp_path):
    """``staleness_grace`` (the sibling of eager updates: a result one version stale, the
    normal case here, weighs in full) goes from the settings through
    :meth:`Coordinator.prepare`, as ``serve`` and ``demo`` call it, into both aggregators."""
    cfg, corpus, ckpt = tiny_moe_seed
    coord = Coordinator(cfg, tmp_path / "coordinator", corpus)
    coord.start()
    try:
        coord.prepare(ckpt, replace(SETTINGS, staleness_grace=3))
        state = coord.state
        assert state.shared.staleness_grace == state.columns.staleness_grace == 3
        # a column result 3 versions stale moves its master all the way to its target
        target = {k: v + 1 for k, v in state.columns.published(0).items()}
        delta = {k: torch.ones_like(v) for k, v in target.items()}
        assert state.columns.apply(0, delta, base_version=0, current_version=3) == 1.0
    finally:
        coord.shutdown()


def test_eager_updates_setting_is_checked():
    with pytest.raises(FederationSettingsError, match="eager_updates"):
        FederationSettings(eager_updates=-1)


def _nbytes(*states: dict) -> int:
    return sum(t.numel() * t.element_size() for state in states for t in state.values())


def test_the_planner_counts_what_a_node_keeps_between_units(loop, trainer, tiny_moe_seed):
    """``perspective plan``'s participant host RAM is what the trainer really holds: the
    replica, its local copies, the shared residual and the bf16 corrections."""
    _run(trainer, loop, _lease(loop))
    _run(trainer, loop, _lease(loop))  # two results in transit, neither applied yet
    local, in_transit = trainer.local, trainer._in_transit
    assert len(in_transit) == 2 and local.unsent
    plan = estimate_participant_host(
        count_params(tiny_moe_seed[0]),
        stage=3,
        columns=len(trainer.replica.columns),
        results_in_transit=len(in_transit),
    )
    assert plan.replica == _nbytes(trainer.replica.shared, *trainer.replica.columns.values())
    assert plan.local_columns == _nbytes(*local.columns.values())
    assert plan.residual == _nbytes(local.residual)
    unsent = [left_out for _, left_out in local.unsent.values()]
    assert plan.corrections == _nbytes(*unsent, *(t.pseudo for t in in_transit))
    assert plan.teacher == 0
