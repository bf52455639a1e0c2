"""A node that trained for one network and gets a unit of another starts afresh.

Two coordinators started from the same seed on fresh databases publish versions with the
same numbers and other weights (what the test networks of one module see, and an
operator who restarts on an empty database with the daemons running). Each unit names
its network (``ControlRequest.network_id``, the digest of the root version's record); a
node holding another network's state drops its replicas, local columns, EF residual and
optimizer and syncs from the new network's checkpoint. Before, its replica failed the
digests of the first delta it applied (CI: three units of a test node failed this way)
and its local columns would have gone up against weights they never came from.

Real pieces: two coordinators' loops (leasing, intake, publishing) and the participant's
own :class:`~participant.unit_trainer.UnitTrainer`, on each coordinator's blob store.
"""

from __future__ import annotations

from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.db import participants as db_participants
from coordinator.db import versions as db_versions
from coordinator.federation_settings import FederationSettings
from participant.unit_trainer import UnitTrainer
from tests.test_federation_intake import local_io

SETTINGS = FederationSettings(
    stage=3, steps_per_unit=3, buffer_size=1, eval_every=1000, max_in_flight=3,
)  # fmt: skip


def network_loop(seed, path, settings: FederationSettings = SETTINGS):
    """A started coordinator on ``path`` and its stage loop (no transport: units are leased
    and results received in the test's own thread), as ``serve`` and ``demo`` build them."""
    cfg, corpus, ckpt = seed
    coord = Coordinator(cfg, path, corpus)
    coord.start()
    coord.prepare(ckpt, settings)
    return coord, coord.federated_stage(None, StageBudget(minutes=30), settings)


def lease_unit(loop, node_id: int):
    """The control message of a unit leased to ``node_id``, as the loop sends it."""
    with loop.factory.begin() as s:
        p = db_participants.touch_participant(s, node_id=node_id)
        return loop.units.request(loop.units.lease(s, p, loop.state), loop.state, node_id)


def _train(trainer, loop, node_id: int, versions: int) -> None:
    """``trainer`` trains units of ``node_id`` until ``loop`` published ``versions``."""
    while loop.state.version < versions:
        req = lease_unit(loop, node_id)
        result = trainer.run(req, local_io(loop.state.store, req.unit.unit_id))
        assert loop.receive(node_id, result).accepted


def _blobs(result) -> list[str]:
    refs = [d.delta.content_id for d in result.column_deltas]
    return refs + [result.shared_update.blob.content_id]


def test_a_node_of_another_network_drops_its_state_and_syncs_afresh(tiny_moe_seed, tmp_path):
    cfg, corpus, _ = tiny_moe_seed
    old, old_loop = network_loop(tiny_moe_seed, tmp_path / "old")
    new, new_loop = network_loop(tiny_moe_seed, tmp_path / "new")
    try:
        node = UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "node")
        _train(node, old_loop, 1, versions=2)  # its last unit trained from version 1
        other = UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "other")
        _train(other, new_loop, 2, versions=3)  # the new network is past it
        req = lease_unit(new_loop, 1)
        assert req.network_id and req.network_id != lease_unit(old_loop, 1).network_id
        assert node.local.network != req.network_id and node.replica.version == 1

        result = node.run(req, local_io(new_loop.state.store, req.unit.unit_id))
        # The same unit on a node that never trained: the same bytes, so nothing of the
        # old network (replica, local columns, residual, optimizer moments) went into it.
        fresh = UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "fresh")
        expected = fresh.run(req, local_io(new_loop.state.store, req.unit.unit_id))
        assert _blobs(result) == _blobs(expected)
        assert node.replica.version == 3 and new_loop.receive(1, result).accepted
        # What the node saved says whose it is: a restarted daemon keeps it.
        assert UnitTrainer(cfg, corpus.dataset("train"), tmp_path / "node").local.network == (
            req.network_id
        )
    finally:
        old.shutdown()
        new.shutdown()
    # A restarted coordinator on the same database is the same network.
    again = Coordinator(cfg, tmp_path / "new", corpus)
    try:
        with again.session_factory() as s:
            assert db_versions.network_id(s) == req.network_id
    finally:
        again.shutdown()
