"""The coordinator's held-out check of a column result before it is applied (intake step 5).

A column has one owner, so no average over participants can dilute a poisoned column (a
sign-flipped delta of normal size passes every norm bound). Before a result is applied,
the coordinator rebuilds the model the participant ended its unit with — the published
shared layers minus the result's shared pseudo-gradient, and the column as of the unit's
base plus its delta — and computes the LM loss of a small fixed batch of held-out
(validation) documents routed to that column, through that column only, with the base
model and with the participant's. A result whose model is worse than its base by more than
``tolerance`` (relative) is refused (``LOSS_INCREASE``): Templar's loss-scored updates.

Why the participant's whole model and not the column alone: a column is trained together
with the participant's drifting copy of the shared layers, and scored with the published
ones it is *worse* after an honest unit about half the time (measured on ``tiny``: median
+0.5 %, up to +2.5 %), which leaves no margin against a sign-flipped column. Scored with
its own shared layers an honest unit improves its column's held-out loss.

Costs three forward passes of ``sequences`` sequences per column of a result (the base's
is cached per version). A column with fewer held-out tokens than one sequence is checked
on the whole validation set instead. The shared layers are the newest published ones, not
those of the unit's base (the coordinator keeps only the newest): a stale result is
scored a little against a moved base.
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
    """Held-out loss of a column with a result's base model and with the participant's.

    Args:
        state: the coordinator state (masters, published shared layers, version).
        val: the validation documents (never given to participants).
        assignment: the document → column routing (re-scoring may change it).
        sequences: held-out sequences per column.
        tolerance: refuse when ``participant's > base's × (1 + tolerance)``.
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
        self._base_loss: dict[tuple, float] = {}  # (column, base, shared id, routing) -> loss
        self.checked: list[tuple[int, float, float]] = []  # (column, before, after), recent

    def check(self, column: int, delta: State, base_version: int, shared_grad: State) -> float:
        """Relative change of the held-out loss from the base model to the participant's.

        Raises:
            ColumnWorse: the change is above ``tolerance``.
        """
        batch = self._batch(column)
        base = self.state.columns.published_at(column, base_version)
        before = self._before(column, base_version, base, batch)
        shared = self.state.shared.published
        self.model.load_state_dict({k: v - shared_grad[k] for k, v in shared.items()}, strict=False)
        self._shared_id = None  # the published shared layers must be reloaded
        after = self._loss(column, {k: v + delta[k] for k, v in base.items()}, batch)
        self.checked = [*self.checked[-255:], (column, before, after)]
        change = (after - before) / max(before, 1e-12)
        if change > self.tolerance:
            raise ColumnWorse(
                f"column {column}: held-out loss of the result's model {after:.4f} vs its base "
                f"{before:.4f} (+{100 * change:.2f} %; the bound is "
                f"+{100 * self.tolerance:.2f} %, column_loss_tolerance)"
            )
        return change

    def _before(self, column: int, base_version: int, base: State, batch) -> float:
        key = (column, base_version, id(self.state.shared.published), self._routing)
        if key not in self._base_loss:
            self._load_shared()
            self._base_loss = {k: v for k, v in self._base_loss.items() if k[2] == key[2]}
            self._base_loss[key] = self._loss(column, base, batch)
        return self._base_loss[key]

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
