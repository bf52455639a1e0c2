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

Costs two forward passes per result, each over ``sequences`` sequences of every column
it carries (a sequence goes through its own column: column mode): the bases' and the
participant's (the bases' loss is cached per version). One forward per column made the
check most of the coordinator's loop on ``tiny`` (py-spy of ``make demo``: 62 % of the
loop's samples), and results waited on it while their participants waited for units. A
column with fewer held-out tokens than one sequence is checked on the whole validation
set instead. The shared layers are the newest published ones, not
those of the unit's base (the coordinator keeps only the newest): a stale result is
scored a little against a moved base.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from coordinator.routing.assignment import ColumnAssignment
from coordinator.validation import EVAL_SEED
from shared_model.data import DocumentDataset
from shared_model.model import PerspectiveModel

State = dict[str, torch.Tensor]

#: Held-out sequences scored in one forward (several columns' share one).
MAX_ROWS = 64


class ColumnWorse(ValueError):
    """A column result makes the held-out loss of its column clearly worse."""


class ColumnValidator:
    """Held-out loss of a column with a result's base model and with the participant's.

    Args:
        state: the coordinator state (masters, published shared layers, version).
        val: the validation documents (never given to participants).
        assignment: the document → column routing (re-scoring may change it).
        sequences: held-out sequences per column.
        window: tokens per sequence, at most ``train.seq_len``: the check's cost is
            sequences × window tokens through two models per column, whatever the
            training sequences' length (on ``small``, 8 × 128 made it most of the
            coordinator's work: docs/federated-training.md §3.3).
        tolerance: refuse when ``participant's > base's × (1 + tolerance)``.
    """

    def __init__(
        self,
        state,
        val: DocumentDataset,
        assignment: ColumnAssignment,
        *,
        sequences: int,
        window: int,
        tolerance: float,
    ) -> None:
        self.state, self.val, self.assignment = state, val, assignment
        self.sequences, self.tolerance = sequences, tolerance
        self.window = min(window, state.cfg.train.seq_len)
        self.model = PerspectiveModel(state.cfg, moe=True).eval()
        self._shared_id: int | None = None
        self._routing: str | None = None
        self._batches: dict[int, torch.Tensor] = {}
        # (column, base, shared id, routing, ternary fraction) -> loss
        self._base_loss: dict[tuple, float] = {}
        self.checked: list[tuple[int, float, float]] = []  # (column, before, after), recent

    def check_all(
        self,
        deltas: dict[int, State],
        base_version: int,
        shared_grad: State,
        *,
        fraction: float | None = None,
    ) -> dict[int, float]:
        """Relative change of each column's held-out loss, from the result's base model to
        the participant's; ``deltas``: column -> its delta.

        ``fraction`` (stage 4: the unit's ternary fraction) scores both models as the unit
        trained them, with that share of their expert weights ternary: a unit at fraction 1
        returns ternary columns, which scored against an FP base would look worse by the
        whole quantisation (measured: +10.7 % on a ``tiny`` demo's column).

        Raises:
            ColumnWorse: a column's change is above ``tolerance`` (the first such column).
        """
        self._sync_routing()
        self.model.set_ternary_fraction(fraction if fraction else None)
        columns = sorted(deltas)
        bases = {c: self.state.columns.published_at(c, base_version) for c in columns}
        before = self._before(bases, base_version, fraction)
        shared = self.state.shared.published
        self.model.load_state_dict({k: v - shared_grad[k] for k, v in shared.items()}, strict=False)
        self._shared_id = None  # the published shared layers must be reloaded
        ends = {c: {k: v + deltas[c][k] for k, v in bases[c].items()} for c in columns}
        after = self._losses(ends)
        self.checked = [*self.checked, *((c, before[c], after[c]) for c in columns)][-256:]
        changes = {c: (after[c] - before[c]) / max(before[c], 1e-12) for c in columns}
        for c in columns:
            if changes[c] > self.tolerance:
                raise ColumnWorse(
                    f"column {c}: held-out loss of the result's model {after[c]:.4f} vs its "
                    f"base {before[c]:.4f} (+{100 * changes[c]:.2f} %; the bound is "
                    f"+{100 * self.tolerance:.2f} %, column_loss_tolerance)"
                )
        return changes

    def _before(
        self, bases: dict[int, State], base_version: int, fraction: float | None
    ) -> dict[int, float]:
        """The base model's loss of each column (published shared layers), cached."""
        shared_id = id(self.state.shared.published)
        key = {c: (c, base_version, shared_id, self._routing, fraction) for c in bases}
        missing = {c: w for c, w in bases.items() if key[c] not in self._base_loss}
        if missing:
            self._load_shared()
            self._base_loss = {k: v for k, v in self._base_loss.items() if k[2] == shared_id}
            for c, loss in self._losses(missing).items():
                self._base_loss[key[c]] = loss
        return {c: self._base_loss[key[c]] for c in bases}

    def _losses(self, weights: dict[int, State]) -> dict[int, float]:
        """Mean LM loss of each column's held-out sequences through that column, with its
        expert weights ``weights[column]``: one forward per ``MAX_ROWS`` sequences."""
        per_forward = max(1, MAX_ROWS // max(1, self.sequences))
        columns = list(weights)
        out: dict[int, float] = {}
        for i in range(0, len(columns), per_forward):
            out.update(self._forward({c: weights[c] for c in columns[i : i + per_forward]}))
        return out

    @torch.no_grad()
    def _forward(self, weights: dict[int, State]) -> dict[int, float]:
        for column, w in weights.items():
            self.model.load_expert_state(column, w)
        batches = [self._batch(c) for c in weights]
        batch = torch.cat(batches)
        sizes = [b.shape[0] for b in batches]
        cols = torch.cat(
            [torch.full((n,), c, dtype=torch.long) for c, n in zip(weights, sizes, strict=True)]
        )
        logits = self.model(batch[:, :-1], columns=cols).logits
        per_row = F.cross_entropy(
            logits.float().transpose(1, 2), batch[:, 1:], reduction="none"
        ).mean(dim=1)  # every row has the same length: the mean of rows is the token mean
        rows = per_row.split(sizes)
        return {c: float(r.mean()) for c, r in zip(weights, rows, strict=True)}

    def _load_shared(self) -> None:
        published = self.state.shared.published  # replaced (not mutated) at each version
        if id(published) != self._shared_id:
            self.model.load_state_dict(published, strict=False)
            self._shared_id = id(published)

    def _sync_routing(self) -> None:
        """Drop the held-out batches (and so the cached base losses' key) when the
        document routing has changed since the last check (re-scoring)."""
        routing = hashlib.sha1(self.assignment.labels.tobytes()).hexdigest()
        if routing != self._routing:
            self._batches, self._routing = {}, routing

    def _batch(self, column: int) -> torch.Tensor:
        """The fixed held-out sequences of ``column`` under the routing of the last
        :meth:`_sync_routing`."""
        if column not in self._batches:
            cols = self.assignment.route(self.val)
            ids = [int(d) for d, c in zip(self.val.doc_ids, cols, strict=True) if c == column]
            held = self.val.subset(ids) if ids else self.val
            if held.n_tokens <= self.window + 1:
                held = self.val
            rows = [
                held.batch(i, 1, self.window, EVAL_SEED + column) for i in range(self.sequences)
            ]
            self._batches[column] = torch.cat(rows)
        return self._batches[column]
