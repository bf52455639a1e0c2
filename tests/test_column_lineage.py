"""A node starts a column from the published weights once another node trained it.

A node keeps its columns' training between units and sends ``local - published``. When a
unit of its columns went to another node (a failed or expired lease re-queued, or
columns replicated over more nodes than columns), the published column came from that
node's copy, and the first node's ``local - published`` reverted it. The coordinator
records who was leased each column last (``column_lineage``) and names such columns in
``WorkUnit.fresh_columns``; the node starts them from the published weights.

Real pieces: the coordinator's loop as ``serve`` and ``demo`` build it (leasing, its
Flower reply path, intake, publishing, SQLite) and the participant's own
:class:`~participant.unit_trainer.UnitTrainer`, on the coordinator's blob store.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from coordinator.db.leases import claim_columns
from coordinator.db.models import Participant, WorkUnit
from coordinator.flower.driver import Reply
from participant.unit_trainer import CORRECTION_DTYPE, UnitTrainer
from shared_model.federated.updates import read_bundle
from tests.test_federation_intake import local_io
from tests.test_in_unit_sync import _same
from tests.test_network_change import lease_unit, network_loop

A, B = 11, 22


def _train(node: UnitTrainer, loop, req, column: int) -> tuple[dict, object]:
    """Train ``req`` on ``node``; returns ``column``'s local copy as the training started
    (read when the trainer reports its first step, with the optimiser steps its weights'
    AdamW state has taken then under ``"adam_steps"``) and the result."""
    start: dict = {}

    def progress(phase: str, step: int, steps: int, tokens: int) -> None:
        if phase == "train" and step == 0:
            start.update({k: v.clone() for k, v in node.local.columns[column].items()})
            params = dict(node.model.named_parameters())
            states = [node.optimizer.state.get(params[k], {}) for k in start]
            start["adam_steps"] = {int(st["step"]) if st else 0 for st in states}

    trained = node.train(req, local_io(loop.state.store, req.unit.unit_id), progress)
    return start, trained


@pytest.fixture
def network(tiny_moe_seed, tmp_path):
    """``(loop, node A, node B)``: the coordinator's loop as ``serve`` builds it and two
    participants' trainers."""
    cfg, corpus, _ = tiny_moe_seed
    coord, loop = network_loop(tiny_moe_seed, tmp_path / "coordinator")
    nodes = [UnitTrainer(cfg, corpus.dataset("train"), tmp_path / n) for n in ("a", "b")]
    try:
        yield loop, *nodes
    finally:
        coord.shutdown()


def _hand_over(loop, failed, node_b: UnitTrainer, column: int):
    """A's unit ``failed`` fails (its handler raised); B is leased the copy and trains it,
    accepted. Returns B's control message."""
    loop._message_units["m-err"] = [failed.unit.unit_id]
    loop._handle_reply(Reply("m-err", A, "train.unit", None, 2, "handler raised", 0.0))
    copy = lease_unit(loop, B)
    _, by_b = _train(node_b, loop, copy, column)
    assert loop.receive(B, by_b.encode()).accepted
    return copy


def test_a_node_starts_a_column_another_node_trained_since_from_the_published_weights(network):
    loop, node_a, node_b = network
    first = lease_unit(loop, A)
    columns = list(first.unit.columns)
    column = columns[0]
    # The stage's first unit on these columns: no copy of an earlier stage is taken.
    assert list(first.unit.fresh_columns) == columns
    _, trained = _train(node_a, loop, first, column)
    assert loop.receive(A, trained.encode()).accepted

    # Its next unit carries on from its own copy (not the published weights: those
    # are its delta as the column codec coded it).
    second = lease_unit(loop, A)
    assert list(second.unit.columns) == columns and not second.unit.fresh_columns
    start, _ = _train(node_a, loop, second, column)
    assert start.pop("adam_steps") == {first.unit.steps}  # its moments carry on too
    assert _same(start, trained.capture.columns[column])
    assert not _same(start, loop.state.columns.published(column))

    # That unit fails on A after it trained; B takes the copy and trains it.
    copy = _hand_over(loop, second, node_b, column)
    assert list(copy.unit.columns) == columns and list(copy.unit.fresh_columns) == columns

    # A's next unit on them starts from the published weights, B's training in them
    # (nothing of A's copy: A trained it since its last delta, in the failed unit), and
    # forgets its AdamW moments of its own abandoned copy (the same model and optimiser
    # object: the shared layers' state carries on).
    third = lease_unit(loop, A)
    assert list(third.unit.columns) == columns
    assert list(third.unit.fresh_columns) == columns
    shared = next(p for n, p in node_a.model.named_parameters() if ".experts." not in n)
    start, trained = _train(node_a, loop, third, column)
    assert start.pop("adam_steps") == {0}
    assert int(node_a.optimizer.state[shared]["step"]) == 3 * first.unit.steps
    assert _same(start, loop.state.columns.published_at(column, trained.base))
    assert loop.receive(A, trained.encode()).accepted

    # The one after carries on again. The update bounds measured the three fresh
    # starts (one unit's training each) against their own history and the carried-on
    # copy (its whole distance from the published column) against its own.
    fourth = lease_unit(loop, A)
    assert list(fourth.unit.columns) == columns and not fourth.unit.fresh_columns
    _, trained = _train(node_a, loop, fourth, column)
    assert loop.receive(A, trained.encode()).accepted
    counts = {k: len(v) for k, v in loop.intake.bounds.history().items()}
    weight = "layers.0.ffn.experts.*.w1.weight"
    assert counts[f"fresh column:{weight}"] == 3 * len(columns)
    assert counts[f"column:{weight}"] == len(columns)


def test_a_node_restarting_a_column_keeps_what_its_last_delta_left_out(network):
    """The column codec sends part of ``local - published`` (the sparse codec, top-k); the
    rest stays in the node's copy. A restart from the published weights keeps that rest,
    when the node trained the column no further since: published + (copy - base - sent)."""
    loop, node_a, node_b = network
    first = lease_unit(loop, A)
    column = first.unit.columns[0]
    _, trained = _train(node_a, loop, first, column)
    result = trained.encode()
    assert loop.receive(A, result).accepted
    ref = next(d.delta for d in result.column_deltas if d.column == column)
    copy_a = trained.capture.columns[column]
    shapes = {k: tuple(v.shape) for k, v in copy_a.items()}
    _, sent = read_bundle(loop.state.store.get(ref.content_id), kind="column", expected=shapes)
    base = loop.state.columns.published_at(column, trained.base)
    # kept in bf16: a remainder, not a replica (half the memory of an FP32 copy)
    left_out = {k: (copy_a[k] - base[k] - sent[k]).to(CORRECTION_DTYPE).float() for k in copy_a}
    assert all(float(v.abs().max()) > 0 for v in left_out.values())  # the codec drops some

    # A's next unit fails before A trains it; B takes the columns and trains them.
    _hand_over(loop, lease_unit(loop, A), node_b, column)

    third = lease_unit(loop, A)
    assert column in third.unit.fresh_columns
    start, trained = _train(node_a, loop, third, column)
    start.pop("adam_steps")
    published = loop.state.columns.published_at(column, trained.base)
    assert _same(start, {k: published[k] + left_out[k] for k in published})


def test_the_lineage_is_per_stage_and_follows_the_last_lease(network):
    """``claim_columns``: the columns a lease must start from the published weights."""
    loop = network[0]
    lease_unit(loop, A), lease_unit(loop, B)  # both nodes known to the database
    with loop.factory.begin() as s:
        ids = dict(s.execute(select(Participant.node_id, Participant.id)).all())

        def claim(node: int, columns: list[int], stage: str = "stage4") -> list[int]:
            unit = WorkUnit(
                unit_id=f"u{node}-{columns}-{stage}", participant_id=ids[node], stage=stage,
                columns=columns,
            )  # fmt: skip
            return claim_columns(s, unit=unit)

        assert claim(A, [6, 7]) == [6, 7]  # first in the stage
        assert claim(A, [6, 7]) == []  # its own
        assert claim(B, [7]) == [7]  # A's until now
        assert claim(A, [6, 7]) == [7]  # B was leased 7 since
        assert claim(A, [6, 7], stage="stage5") == [6, 7]  # another stage
