"""Routing refined by participants' per-document losses (scoring units, re-scoring).

The move rule is tested on hand-built tables; the participant side with the real
:class:`UnitTrainer`; the loop and the restart with real units through the in-process
federation loop of test_federation_intake.py (no transport).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coordinator.central.checkpoint import save_checkpoint
from coordinator.coordinator_process import Coordinator
from coordinator.db import doc_routing
from coordinator.db import events as db_events
from coordinator.db import participants as db_participants
from coordinator.federation_settings import FederationSettings
from coordinator.routing.assign import CentroidRouter
from coordinator.routing.assignment import ColumnAssignment
from coordinator.routing.rescoring import (
    DocumentLossTable,
    Rescoring,
    RescoringError,
    capacity_bounds,
    rescore,
    restore_labels,
)
from participant.scoring import scoring_sequence
from participant.unit_trainer import UnitTrainer
from shared_model.model import PerspectiveModel
from tests.test_federation_intake import NODE, corpus, local_io, make_loop  # noqa: F401

torch.set_num_threads(1)


def hand_assignment(labels: list[int], n_columns: int) -> ColumnAssignment:
    """Documents 100, 101, ... with the given columns (router and features unused here)."""
    doc_ids = np.arange(100, 100 + len(labels), dtype=np.int64)
    router = CentroidRouter(np.zeros((n_columns, 1)))
    return ColumnAssignment(doc_ids, np.array(labels, dtype=np.int64), router, np.zeros((1, 1)))


def table(rows: dict[int, dict[int, float]]) -> DocumentLossTable:
    t = DocumentLossTable()
    for doc, row in rows.items():
        t.update(doc, row)
    return t


def test_moves_only_beyond_the_margin():
    a = hand_assignment([0, 0, 1, 1, 1, 0], 2)
    losses = table({100: {0: 3.0, 1: 2.97}, 101: {0: 3.0, 1: 2.0}, 102: {1: 3.0}})
    moves = rescore(a, losses, slack=2.0, margin=0.02)
    # 100 is only 1 % better under column 1; 102 has no alternative measured.
    assert [(m.doc, m.source, m.target) for m in moves] == [(101, 0, 1)]
    assert moves[0].improvement == pytest.approx(1 / 3)
    assert a.labels.tolist() == [0, 1, 1, 1, 1, 0]
    assert a.documents(1) == [101, 102, 103, 104]


def test_capacity_bounds_and_greedy_order():
    # 6 documents, 2 columns, slack 1.5: at most ceil(3 * 1.5) = 5, at least floor(3 / 1.5) = 2.
    assert capacity_bounds(6, 2, 1.5) == (2, 5)
    a = hand_assignment([0, 0, 0, 1, 1, 1], 2)
    losses = table({100: {0: 3.0, 1: 2.5}, 101: {0: 3.0, 1: 1.0}, 102: {0: 3.0, 1: 2.0}})
    moves = rescore(a, losses, slack=1.5, margin=0.02)
    # Column 0 may not drop below 2 documents: only the largest improvement moves.
    assert [m.doc for m in moves] == [101]
    # A full target is skipped for the next-best column that has room.
    b = hand_assignment([0, 1, 1, 2, 2, 2], 3)
    losses = table({103: {2: 4.0, 1: 1.0, 0: 3.0}})
    moves = rescore(b, losses, slack=1.0, margin=0.0)  # bounds (2, 2): column 1 is full
    assert [(m.doc, m.target) for m in moves] == [(103, 0)]


def test_rescore_is_deterministic_and_breaks_ties_by_document():
    rows = {104: {1: 2.0, 0: 1.0}, 103: {1: 2.0, 0: 1.0}, 105: {1: 2.0, 0: 1.0}}
    results = []
    for _ in range(2):
        a = hand_assignment([0, 0, 0, 1, 1, 1], 2)
        moves = rescore(a, table(rows), slack=4 / 3, margin=0.02)  # column 0 takes one more
        results.append(([(m.doc, m.target) for m in moves], a.labels.tolist()))
    assert results[0] == results[1]
    assert results[0][0] == [(103, 0)]


def test_settings_are_validated_and_scoring_is_off_by_default():
    for bad in (
        {"score_every": -1},
        {"rescore_every_versions": -2},
        {"rescore_margin": 1.0},
        {"rescore_slack": 0.9},
    ):
        with pytest.raises(RescoringError, match="must be"):
            FederationSettings(**bad)
    off = Rescoring(FederationSettings(), hand_assignment([0, 1], 2))
    unit = type("Unit", (), {"params": {}})()
    for _ in range(5):
        off.mark(unit)
    assert unit.params == {}
    off.table.update(100, {0: 3.0, 1: 1.0})
    assert not any(off.due(v) for v in range(1, 10))


def lease_scoring_unit(loop, train, tmp_path):
    """A unit leased through the loop (so scoring marks apply), trained for real."""
    with loop.factory.begin() as s:
        db_participants.touch_participant(
            s, node_id=NODE, capability=db_participants.Capability(max_columns=2)
        )
    _, req = loop.lease_request(NODE)
    io = local_io(loop.state.store, req.unit.unit_id)
    trainer = UnitTrainer(loop.state.cfg, train, tmp_path / "participant")
    return req, trainer, trainer.run(req, io)


def test_scoring_unit_reports_every_document_under_every_column(tmp_path, corpus):  # noqa: F811
    loop, train = make_loop(tmp_path, corpus, score_every=1)
    req, trainer, result = lease_scoring_unit(loop, train, tmp_path)
    assert req.unit.score_documents
    columns = sorted(req.unit.columns)
    assert len(columns) == 2
    docs = {ref.doc: ref.column for ref in req.unit.documents}
    got = {(e.doc, e.column): e.loss for e in result.document_losses}
    assert set(got) == {(d, c) for d in docs for c in columns}
    assert all(math.isfinite(v) and v > 0 for v in got.values())
    assert result.timings.score_s > 0
    # The loss under the document's own column is the model's own loss on that sequence.
    doc, own = next(iter(docs.items()))
    tokens = dict(train.subset([int(doc)]).iter_documents())[int(doc)]
    seq = scoring_sequence(tokens, train.eot_id, req.seq_len)
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(seq[:, :-1], targets=seq[:, 1:], columns=torch.tensor([own]))
    assert got[(doc, own)] == pytest.approx(float(out.loss), abs=1e-5)
    # Units that are not scoring units report nothing.
    plain, _ = make_loop(tmp_path / "plain", corpus)
    _, _, quiet = lease_scoring_unit(plain, train, tmp_path / "plain")
    assert len(quiet.document_losses) == 0


def events(loop, kind):
    with loop.factory() as s:
        return [e.message for e in db_events.list_events(s, kind=kind, limit=1000).items]


def run_scoring_loop(tmp_path, corpus):  # noqa: F811
    # Margin 0: any lower measured loss moves a document (real losses of a few steps'
    # training differ by well under 2 % between columns).
    loop, train = make_loop(
        tmp_path, corpus, score_every=1, rescore_every_versions=1, rescore_margin=0.0
    )
    initial = loop.assignment.labels.copy()
    for _ in range(4):
        _, _, result = lease_scoring_unit(loop, train, tmp_path)
        assert loop.receive(NODE, result).accepted
    return loop, train, initial


def test_loop_rescores_and_restart_keeps_the_routing(tmp_path, corpus):  # noqa: F811
    loop, train, initial = run_scoring_loop(tmp_path, corpus)
    assert loop.state.version == 2
    moved = int((loop.assignment.labels != initial).sum())
    assert moved > 0
    logged = events(loop, "routing.rescored")
    assert len(logged) == 2 and sum(int(m.split("moved ")[1].split()[0]) for m in logged) >= moved
    assert loop.units.assignment is loop.assignment  # new units draw from the new routing
    with loop.factory() as s:
        assert doc_routing.latest_epoch(s) in (1, 2)
    # A restarted coordinator: versions replay bit for bit and the routing is the re-scored
    # one, with the loss table rebuilt from the database.
    manifests = {v: r.content_id for v, r in loop.state.publisher.manifests.items()}
    restarted, _ = make_loop(tmp_path / "restart", corpus, score_every=1)
    restarted.factory, restarted.state.store = loop.factory, loop.state.store
    restarted.intake.session_factory = loop.factory
    assert np.array_equal(restarted.assignment.labels, initial)
    assert restarted.recover() == 4
    assert {v: r.content_id for v, r in restarted.state.publisher.manifests.items()} == manifests
    assert np.array_equal(restarted.assignment.labels, loop.assignment.labels)
    assert restarted.rescoring.table.rows == loop.rescoring.table.rows
    # Coordinator.prepare (what `coordinator serve` runs first) restores it as well.
    ckpt = tmp_path / "moe.safetensors"
    save_checkpoint(
        ckpt, PerspectiveModel(loop.state.cfg, moe=True), loop.state.cfg, stage=2, step=0
    )
    coord = Coordinator(
        loop.state.cfg, tmp_path / "coord", corpus, db_url=f"sqlite:///{tmp_path / 'db.sqlite'}"
    )
    try:
        coord.prepare(ckpt, FederationSettings(buffer_size=2))
        assert np.array_equal(coord.assignment.labels, loop.assignment.labels)
    finally:
        coord.shutdown()


def test_reported_losses_outside_the_unit_are_ignored(tmp_path, corpus):  # noqa: F811
    loop, train = make_loop(tmp_path, corpus, score_every=1)
    _, _, result = lease_scoring_unit(loop, train, tmp_path)
    result.document_losses[0].column = 99  # a column the unit does not have
    assert loop.receive(NODE, result).accepted  # the training result itself is fine
    assert len(loop.rescoring.table) == 0
    assert "not part of the unit" in events(loop, "routing.scores_ignored")[0]
    with loop.factory() as s:
        assert doc_routing.latest_measurements(s) == {}


def test_stored_routing_for_another_model_is_refused(tmp_path, corpus):  # noqa: F811
    loop, _ = make_loop(tmp_path, corpus)
    docs = {int(d): 99 for d in loop.assignment.doc_ids}  # tiny has 8 columns
    with loop.factory.begin() as s:
        doc_routing.save_assignment(s, epoch=3, assignment=docs)
    with loop.factory() as s, pytest.raises(RescoringError, match="another configuration"):
        restore_labels(s, loop.assignment)
