"""Document routing refined by the per-document losses participants report ("scoring").

The initial assignment (balanced k-means over stage-2 features,
:mod:`coordinator.routing.assignment`) cannot know which column will model a document best:
at the start of stage 3 every expert is a clone. Once columns differ, every
``score_every``-th unit leased is a *scoring unit* (``WorkUnit.score_documents``): after
training, the participant reports each of the unit's documents' loss under every column it
holds (``WorkResult.document_losses``, :mod:`participant.scoring`). Every
``rescore_every_versions`` published versions, :func:`rescore` moves a document from its
column c to column c' when c' models it better by a relative ``margin`` —
``loss(c') < (1 - margin) · loss(c)`` — within the balance bounds (DESIGN §3: the
assignment is the balance term).

Losses compare like for like only when measured together (same unit, same model), so the
:class:`DocumentLossTable` keeps, per document, the losses of its newest scoring unit and
drops older ones. The losses are stored in ``doc_losses`` with the result, in its
transaction; every re-scored assignment is stored in ``document_assignments`` as routing
epoch = the version it was computed at; a restarted coordinator reloads both
(:meth:`Rescoring.restore`, :func:`restore_labels`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from coordinator.db import doc_routing
from coordinator.db.errors import Conflict
from coordinator.routing import unit_documents
from coordinator.routing.assignment import ColumnAssignment
from coordinator.routing.scoring_settings import RescoringError, check_rescoring


@dataclass
class DocumentLossTable:
    """Sparse per-document losses: ``doc id -> {column: loss}`` from one scoring unit."""

    rows: dict[int, dict[int, float]] = field(default_factory=dict)

    def update(self, doc: int, losses: dict[int, float]) -> None:
        """Replace ``doc``'s row with a newer measurement (all columns measured together)."""
        self.rows[int(doc)] = {int(c): float(v) for c, v in losses.items()}

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Move:
    """One document re-routed by :func:`rescore`."""

    doc: int
    source: int
    target: int
    improvement: float  # (loss(source) - loss(target)) / loss(source)


def capacity_bounds(n_docs: int, n_columns: int, slack: float) -> tuple[int, int]:
    """``(floor(D/C / slack), ceil(D/C · slack))``: fewest and most documents per column."""
    mean = n_docs / n_columns
    return math.floor(mean / slack), max(1, math.ceil(mean * slack))


def rescore(
    assignment: ColumnAssignment, table: DocumentLossTable, *, slack: float, margin: float
) -> list[Move]:
    """Move documents to columns that model them better; updates ``assignment.labels``.

    A document moves from its column c to c' only if both losses are known and
    ``loss(c') < (1 - margin) · loss(c)``; candidates are taken greedily by relative
    improvement (ties: lower document id), each to its best column that is below the
    upper bound while c stays above the lower bound (:func:`capacity_bounds`).
    Deterministic: the same inputs give the same moves. The centroid router is unchanged.

    Returns:
        The moves made, in the order made.
    """
    check_rescoring(0, 0, margin, slack)
    labels = assignment.labels
    n_columns = int(assignment.router.centroids.shape[0])
    low, high = capacity_bounds(len(labels), n_columns, slack)
    load = np.bincount(labels, minlength=n_columns)
    index = {int(d): i for i, d in enumerate(assignment.doc_ids)}
    candidates = []
    for doc, row in sorted(table.rows.items()):
        i = index.get(doc)
        own = row.get(int(labels[i])) if i is not None else None
        if own is None or not own > 0:
            continue
        better = sorted(
            ((own - loss) / own, -col)
            for col, loss in row.items()
            if 0 <= col < n_columns and loss < (1.0 - margin) * own
        )[::-1]
        if better:
            candidates.append((-better[0][0], doc, i, [(g, -c) for g, c in better]))
    moves = []
    for _, doc, i, targets in sorted(candidates):
        source = int(labels[i])
        for gain, target in targets:
            if load[target] < high and load[source] > low:
                labels[i] = target
                load[source], load[target] = load[source] - 1, load[target] + 1
                moves.append(Move(doc, source, target, float(gain)))
                break
    return moves


def restore_labels(session, assignment: ColumnAssignment) -> int | None:
    """Apply the newest stored routing epoch to ``assignment`` in place; returns the epoch.

    Documents the epoch does not list keep their label (e.g. a corpus that grew).

    Raises:
        RescoringError: the stored epoch names a column this model does not have.
    """
    epoch = doc_routing.latest_epoch(session)
    if epoch is None:
        return None
    stored = doc_routing.assignment_of(session, epoch=epoch)
    n_columns = int(assignment.router.centroids.shape[0])
    bad = sorted({c for c in stored.values() if not 0 <= c < n_columns})
    if bad:
        raise RescoringError(
            f"routing epoch {epoch} uses columns {bad[:5]}, but the model has {n_columns}: "
            "the database belongs to another configuration; use its config or a new database"
        )
    for i, doc in enumerate(assignment.doc_ids):
        column = stored.get(int(doc))
        if column is not None:
            assignment.labels[i] = column
    return epoch


class Rescoring:
    """The federation loop's scoring: marks units, keeps the table, re-scores, persists.

    Args:
        settings: the stage's :class:`~coordinator.federation_settings.FederationSettings`.
        assignment: the column assignment shared with the unit factory (updated in place).
    """

    def __init__(self, settings, assignment: ColumnAssignment) -> None:
        self.settings, self.assignment = settings, assignment
        self.table = DocumentLossTable()
        self._leased = 0

    def mark(self, unit) -> None:
        """Make every ``score_every``-th unit leased a scoring unit (``params["score"]``)."""
        every = self.settings.score_every
        self._leased += 1
        if every and self._leased % every == 0 and not (unit.params or {}).get("score"):
            unit.params = {**(unit.params or {}), "score": True}  # a new dict: JSON is tracked

    def record(self, session, unit, result, outcome) -> tuple[dict, str]:
        """Store an accepted scoring result's losses in the caller's transaction.

        The losses are recorded as measured on the unit's base version (the participant
        trained from it).

        Returns:
            ``(rows, problem)``: ``doc -> {column: loss}`` to :meth:`observe` after commit,
            and why the losses were ignored ("" when they were not).
        """
        if not result.document_losses or not outcome.accepted or outcome.duplicate:
            return {}, ""
        if not (unit.params or {}).get("score"):
            return {}, f"unit {unit.unit_id} sent document losses it was not asked for"
        rows, problem = _validated(unit, result.document_losses)
        if problem:
            return {}, f"unit {unit.unit_id}: {problem}; its document losses are ignored"
        doc_routing.record_doc_losses(
            session,
            losses=[(d, c, v) for d, row in rows.items() for c, v in row.items()],
            version=int(unit.base_version),
            unit_id=unit.unit_id,
            participant_id=unit.participant_id,
        )
        return rows, ""

    def observe(self, scored: tuple[dict, str], log: Callable[[str, str], None]) -> None:
        """Take committed losses into the table (or log why a result's were ignored)."""
        rows, problem = scored
        if problem:
            log("routing.scores_ignored", problem)
        for doc, row in rows.items():
            self.table.update(doc, row)

    def due(self, version: int) -> bool:
        """Whether to re-score after publishing ``version``."""
        every = self.settings.rescore_every_versions
        return bool(every) and version > 0 and version % every == 0 and len(self.table) > 0

    def rescore(self, session_factory, version: int, log: Callable[[str, str], None]) -> int:
        """Re-score, store the result as routing epoch ``version``, then apply it in memory."""
        trial = dataclasses.replace(self.assignment, labels=self.assignment.labels.copy())
        moves = rescore(
            trial,
            self.table,
            slack=self.settings.rescore_slack,
            margin=self.settings.rescore_margin,
        )
        if moves:
            labels = {int(d): int(c) for d, c in zip(trial.doc_ids, trial.labels, strict=True)}
            try:
                with session_factory.begin() as s:
                    doc_routing.save_assignment(s, epoch=version, assignment=labels)
            except Conflict as exc:  # an epoch of this version exists (replayed): keep it
                log("routing.rescore_skipped", str(exc))
                return 0
            self.assignment.labels[:] = trial.labels  # only once stored: a restart agrees
        log(
            "routing.rescored",
            f"version {version}: moved {len(moves)} documents "
            f"({len(self.table)} scored, margin {self.settings.rescore_margin:.0%})",
        )
        return len(moves)

    def restore(self, session) -> int | None:
        """After a restart: the newest stored routing epoch and every document's losses."""
        epoch = restore_labels(session, self.assignment)
        self.table = DocumentLossTable()
        for doc, row in doc_routing.latest_measurements(session).items():
            self.table.update(doc, row)
        return epoch


def _validated(unit, entries) -> tuple[dict[int, dict[int, float]], str]:
    """``doc -> {column: loss}`` of a result's document losses, or why they are unusable."""
    docs = {doc for _, doc in unit_documents.pairs(unit.docs)}
    columns = {int(c) for c in unit.columns}
    rows: dict[int, dict[int, float]] = {}
    for e in entries:
        doc = int(e.doc)
        if doc not in docs or e.column not in columns:
            return {}, f"document {doc} / column {e.column} is not part of the unit"
        if not (math.isfinite(e.loss) and e.loss >= 0):
            return {}, f"loss {e.loss} of document {doc} is not a finite non-negative number"
        if e.column in rows.setdefault(doc, {}):
            return {}, f"document {doc} / column {e.column} is reported twice"
        rows[doc][int(e.column)] = float(e.loss)
    return rows, ""
