"""The coordinator's held-out check of a column result before it is applied (intake step 5).

A column has one owner, so no average over participants can dilute a poisoned column (a
sign-flipped delta of normal size passes every norm bound). Before a result's column delta
is applied, the coordinator computes what the column's master would become
(:meth:`~coordinator.aggregation.columns.ColumnAggregator.candidate`) and the LM loss of
a small fixed batch of held-out (validation) documents routed to that column, through the
published shared layers and that column only, with the master as it is and as it would
be. A result that raises the loss by more than ``tolerance`` (relative) is refused
(``LOSS_INCREASE``), as Templar scores updates by their loss change.

Costs two forward passes of ``sequences`` sequences per column of a result. A column with
fewer held-out tokens than one sequence is checked on the whole validation set instead.
"""

from __future__ import annotations

import hashlib

import torch

from coordinator.routing.assignment import ColumnAssignment
from coordinator.validation import EVAL_SEED
from shared_model.data import DocumentDataset
from shared_model.model import PerspectiveModel

State = dict[str, torch.Tensor]


class ColumnWorse(ValueError):
    """A column result makes the held-out loss of its column clearly worse."""


class ColumnValidator:
    """Held-out loss of a column before and after a result would be applied.

    Args:
        state: the coordinator state (masters, published shared layers, version).
        val: the validation documents (never given to participants).
        assignment: the document → column routing (re-scoring may change it).
        sequences: held-out sequences per column.
        tolerance: refuse when ``after > before × (1 + tolerance)``.
    """

    def __init__(
        self,
        state,
        val: DocumentDataset,
        assignment: ColumnAssignment,
        *,
        sequences: int,
        tolerance: float,
    ) -> None:
        self.state, self.val, self.assignment = state, val, assignment
        self.sequences, self.tolerance = sequences, tolerance
        self.model = PerspectiveModel(state.cfg, moe=True).eval()
        self._shared_id: int | None = None
        self._routing: str | None = None
        self._batches: dict[int, torch.Tensor] = {}
        self.checked: list[tuple[int, float, float]] = []  # (column, before, after), recent

    def check(self, column: int, delta: State, base_version: int) -> float:
        """Relative change of the held-out loss if ``delta`` were applied to ``column``.

        Raises:
            ColumnWorse: the change is above ``tolerance``.
        """
        batch = self._batch(column)
        self._load_shared()
        columns = self.state.columns
        candidate = columns.candidate(column, delta, base_version, self.state.version)
        before = self._loss(column, columns.masters[column], batch)
        after = self._loss(column, candidate, batch)
        self.checked = [*self.checked[-255:], (column, before, after)]
        change = (after - before) / max(before, 1e-12)
        if change > self.tolerance:
            raise ColumnWorse(
                f"column {column}: held-out loss {before:.4f} -> {after:.4f} "
                f"(+{100 * change:.2f} %; the bound is +{100 * self.tolerance:.2f} %, "
                "column_loss_tolerance)"
            )
        return change

    @torch.no_grad()
    def _loss(self, column: int, weights: State, batch: torch.Tensor) -> float:
        self.model.load_expert_state(column, weights)
        cols = torch.full((batch.shape[0],), column, dtype=torch.long)
        out = self.model(batch[:, :-1], targets=batch[:, 1:], columns=cols)
        return float(out.loss)

    def _load_shared(self) -> None:
        published = self.state.shared.published  # replaced (not mutated) at each version
        if id(published) != self._shared_id:
            self.model.load_state_dict(published, strict=False)
            self._shared_id = id(published)

    def _batch(self, column: int) -> torch.Tensor:
        """The fixed held-out sequences of ``column`` (rebuilt when the routing changes)."""
        routing = hashlib.sha1(self.assignment.labels.tobytes()).hexdigest()
        if routing != self._routing:
            self._batches, self._routing = {}, routing
        if column not in self._batches:
            seq_len = self.state.cfg.train.seq_len
            cols = self.assignment.route(self.val)
            ids = [int(d) for d, c in zip(self.val.doc_ids, cols, strict=True) if c == column]
            held = self.val.subset(ids) if ids else self.val
            if held.n_tokens <= seq_len + 1:
                held = self.val
            rows = [held.batch(i, 1, seq_len, EVAL_SEED + column) for i in range(self.sequences)]
            self._batches[column] = torch.cat(rows)
        return self._batches[column]
