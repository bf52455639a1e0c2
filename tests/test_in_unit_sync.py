"""In-unit shared syncs: a unit of H steps leased as parts of ``shared_sync_every`` steps.

Each part sends its shared pseudo-gradient and starts from the newest shared layers (a
version each, like a unit); its columns train on locally (keep-local) and only every
round(H / ``shared_sync_every``)-th part of a node uploads them, carrying every part's
column training since the last upload. So the shared layers sync every k steps while
the columns (84 % of a ``tiny`` model's weights) sync every H.

Real pieces: the coordinator's loop as ``serve`` and ``demo`` build it (settings →
unit factory, intake, publishing) and the participant's own
:class:`~participant.unit_trainer.UnitTrainer`, on the coordinator's blob store.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from coordinator.db.leases import get_unit
from coordinator.db.stats import accepted_unit_columns, stage_totals
from coordinator.federation_settings import FederationSettings, FederationSettingsError
from coordinator.intake import unit_step_sizes
from participant.unit_trainer import UnitTrainer
from shared_model.wire.perspective.v1 import blobs_pb2, control_pb2
from tests.test_federation_intake import local_io
from tests.test_network_change import SETTINGS, lease_unit, network_loop

PARTS = replace(SETTINGS, steps_per_unit=6, shared_sync_every=3, eager_updates=0.0)


@pytest.fixture
def loop(tiny_moe_seed, tmp_path):
    coord, loop = network_loop(tiny_moe_seed, tmp_path / "coordinator", PARTS)
    yield loop
    coord.shutdown()


def _manifest(loop, version: int) -> control_pb2.VersionManifest:
    ref = loop.state.publisher.manifests[version]
    return control_pb2.VersionManifest.FromString(loop.state.store.get(ref.content_id))


def _io(loop, req):
    """The node's blob I/O, with the blob service's ``Head``: a part starts from the newest
    version, not the one it was leased at."""
    io = local_io(loop.state.store, req.unit.unit_id)

    def head(held: int) -> blobs_pb2.HeadReply:
        version, checkpoint, chain = loop.state.publisher.head(held)
        return blobs_pb2.HeadReply(version=version, checkpoint=checkpoint, versions=chain)

    io.head = head
    return io


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parts_sync_the_shared_layers_and_send_the_columns_once_per_unit(
    loop, tiny_moe_seed, tmp_path
):
    cfg, corpus, _ = tiny_moe_seed
    node = UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "node")
    first, second = lease_unit(loop, 1), lease_unit(loop, 1)
    assert (first.unit.steps, second.unit.steps) == (3, 3)
    assert (first.unit.hold_columns, second.unit.hold_columns) == (True, False)
    assert lease_unit(loop, 1).unit.hold_columns  # the next unit's first part
    (column,) = first.unit.columns[:1]
    published_v0 = {k: v.clone() for k, v in loop.state.columns.published(column).items()}

    one = node.train(first, _io(loop, first))
    result = one.encode()
    assert len(result.column_deltas) == 0 and result.shared_update.blob.content_id
    kept = node.local.columns[column]  # the part's column training, on the node only
    assert not _same(kept, published_v0)
    assert loop.receive(1, result).accepted and loop.state.version == 1
    v1 = _manifest(loop, 1)  # the part's shared update, applied once; no column moved
    assert list(v1.units) == [first.unit.unit_id] and not v1.columns and v1.shared.content_id

    two = node.train(second, _io(loop, second))
    assert int(two.result.base_version) == 1  # it started from the shared layers of v1
    # Its column delta is against the columns as published (still v0's): the two parts'
    # training together, not the second part's alone.
    assert _same(two.capture.published_columns[column], published_v0)
    result = two.encode()
    assert sorted(d.column for d in result.column_deltas) == sorted(second.unit.columns)
    assert loop.receive(1, result).accepted and loop.state.version == 2
    v2 = _manifest(loop, 2)
    assert list(v2.units) == [second.unit.unit_id] and column in v2.columns
    assert not _same(loop.state.columns.published(column), published_v0)
    with loop.factory() as s:  # the unit's tokens counted once: two parts of 3 steps
        totals = stage_totals(s, stage="stage3")
        synced = accepted_unit_columns(s, stage="stage3")  # traffic per sync counts these
    assert (totals.accepted, totals.tokens) == (2, 6 * cfg.train.batch_size * cfg.train.seq_len)
    assert synced == [0, len(second.unit.columns)]  # the held part synced no column


def test_a_part_that_should_hold_its_columns_may_not_send_them(loop, tiny_moe_seed, tmp_path):
    """The intake holds a result to its unit: a held part's column deltas are refused."""
    cfg, corpus, _ = tiny_moe_seed
    node = UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "node")
    first = lease_unit(loop, 1)
    sent = control_pb2.ControlRequest()
    sent.CopyFrom(first)
    sent.unit.hold_columns = False  # a node that ignores the flag
    result = node.run(sent, local_io(loop.state.store, first.unit.unit_id))
    received = loop.receive(1, result)
    assert not received.accepted and "columns" in received.detail


def test_the_update_bounds_measure_a_sending_part_by_the_held_parts_steps_too(loop):
    """A part's column deltas carry its node's training since they last went up (the parts
    that held them too): the bounds scale them by all those steps (√6, not √3), its
    shared update by its own."""
    requests = [lease_unit(loop, 1) for _ in range(3)]  # hold, send, hold
    with loop.factory() as s:
        units = [get_unit(s, unit_id=r.unit.unit_id) for r in requests]
        params = [dict(u.params) for u in units]
        sizes = [unit_step_sizes(loop.intake.bounds, u) for u in units]
    assert [p.get("hold_columns", False) for p in params] == [True, False, True]
    assert [p.get("column_steps") for p in params] == [None, 6, None]
    assert sizes[1][0] == pytest.approx(sizes[1][1] * math.sqrt(2))
    assert sizes[0][0] == sizes[0][1] and sizes[2][0] == sizes[2][1]


def test_the_last_tenth_of_a_stage_sends_columns_with_every_part(tiny_moe_seed, tmp_path):
    """The stage ends with every node's column training published."""
    settings = replace(PARTS, units_hint=1)  # a schedule of 6 steps: 2 parts, then the end
    coord, loop = network_loop(tiny_moe_seed, tmp_path / "coordinator", settings)
    try:
        assert lease_unit(loop, 1).unit.hold_columns
        assert not lease_unit(loop, 1).unit.hold_columns
        # A next unit's first part, at step 6 of 6 (past 90 %): it sends its columns.
        assert not lease_unit(loop, 1).unit.hold_columns
    finally:
        coord.shutdown()


def test_shared_sync_every_is_checked():
    with pytest.raises(FederationSettingsError, match="shared_sync_every"):
        FederationSettings(shared_sync_every=-1)
