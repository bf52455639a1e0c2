"""Building work units: which columns, which documents, which hyper-parameters.

A unit trains the participant's columns (affinity: the columns it already holds) on
documents routed to those columns, for H inner steps — the shared-layer sync period (20 in
the prototype, ``notes/federated-prototype.md``). H is a property of each unit: fixed
(``steps_per_unit``), or sized by :class:`UnitSizing` from the participant's measured
tokens/s so that every unit takes about ``unit_seconds`` of training on any machine. A
re-queued unit (expired or failed elsewhere) is handed out first, to any participant (it
may take columns it did not hold: they start from the published weights), with its steps.

The Flower message carries only the :class:`ControlRequest`; the checkpoint, the version
chain and the training shards are blobs the participant fetches from the blob service
with the unit's capability token (read: everything published; write: a quota sized to
the expected upload).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import object_session

from coordinator.db.participants import get_participant
from coordinator.evaluation import ColumnAssignment
from coordinator.plan.params import count_params
from shared_model.blobs import issue_token
from shared_model.config import PerspectiveConfig
from shared_model.schedule import lr_at, ternary_fraction_at
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2, tensor_pb2

log = logging.getLogger(__name__)

STAGES = {
    3: federation_pb2.STAGE_EXPERT_DIFFERENTIATION,
    4: federation_pb2.STAGE_TERNARY_DISTILLATION,
}


class UnitSizingError(ValueError):
    """Unit-sizing settings that cannot work together (the message says which, and the fix)."""


@dataclass(frozen=True)
class UnitSizing:
    """How many inner steps a new unit gets, from the participant's measured speed.

    With ``unit_seconds`` set, a participant that reported ``tokens_per_s`` gets
    ``clamp(round(unit_seconds * tokens_per_s / tokens_per_step), min_steps, max_steps)``
    steps, so that a unit trains for about ``unit_seconds`` on a fast or a slow machine
    (long enough that Flower's ~3 s poll does not leave it idle). Without a report yet, or
    without ``unit_seconds``, a unit has ``steps_per_unit`` steps.

    The lease bounds it too, with or without ``unit_seconds`` (a slow machine gets fewer
    steps rather than units it cannot finish before their leases expire): a participant
    works through its ``max_in_flight`` units one after the other, so the last leased
    finishes ``max_in_flight`` unit times after its lease started; that must stay under
    ``lease_fraction * lease_seconds`` (the rest is headroom for syncing, uploading and a
    slower-than-reported machine).

    Attributes:
        steps_per_unit: steps of a unit when the speed is unknown or sizing is off.
        unit_seconds: target training time of one unit, seconds; ``None`` = fixed size.
        min_steps: fewest steps of a sized unit (unless the lease allows fewer).
        max_steps: most steps of a sized unit; ``None`` = ``8 * steps_per_unit``.
        lease_seconds: lease duration of every unit.
        max_in_flight: units each participant has leased at once.
        lease_fraction: share of the lease the in-flight units may take to train.
    """

    steps_per_unit: int = 20
    unit_seconds: float | None = None
    min_steps: int = 5
    max_steps: int | None = None
    lease_seconds: float = 300.0
    max_in_flight: int = 2
    lease_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.max_steps is None:
            object.__setattr__(self, "max_steps", max(8 * self.steps_per_unit, self.min_steps))
        if self.steps_per_unit < 1 or self.min_steps < 1 or self.max_steps < 1:
            raise UnitSizingError(
                "steps_per_unit, min_steps_per_unit and max_steps_per_unit must be >= 1; got "
                f"{self.steps_per_unit}, {self.min_steps}, {self.max_steps}"
            )
        if self.min_steps > self.max_steps:
            raise UnitSizingError(
                f"min_steps_per_unit ({self.min_steps}) is larger than max_steps_per_unit "
                f"({self.max_steps}); lower the minimum or raise the maximum"
            )
        if self.unit_seconds is not None and not self.unit_seconds > 0:
            raise UnitSizingError(
                f"unit_seconds must be > 0 (or None for fixed-size units), got {self.unit_seconds}"
            )
        if not 0 < self.lease_fraction <= 1 or self.lease_seconds <= 0 or self.max_in_flight < 1:
            raise UnitSizingError(
                "need 0 < lease_fraction <= 1, lease_seconds > 0 and max_in_flight >= 1; got "
                f"{self.lease_fraction}, {self.lease_seconds}, {self.max_in_flight}"
            )
        budget = self.lease_fraction * self.lease_seconds
        if self.unit_seconds is not None and self.unit_seconds * self.max_in_flight > budget:
            raise UnitSizingError(
                f"{self.max_in_flight} units in flight of unit_seconds={self.unit_seconds} do "
                f"not fit in {self.lease_fraction:.0%} of lease_seconds={self.lease_seconds}; "
                "lower unit_seconds or raise lease_seconds"
            )

    def steps_for(self, tokens_per_s: float | None, tokens_per_step: int) -> int:
        """Steps of a new unit for a participant training ``tokens_per_s`` tokens/s.

        Args:
            tokens_per_s: the participant's last reported training speed (``None`` or 0:
                not reported yet).
            tokens_per_step: tokens of one inner step (``batch_size * seq_len``).
        """
        if not tokens_per_s or tokens_per_s <= 0:
            return self.steps_per_unit
        step_s = tokens_per_step / tokens_per_s
        if self.unit_seconds is None:  # fixed H, but never more than a slow node can do
            steps = self.steps_per_unit
        else:
            steps = min(max(round(self.unit_seconds / step_s), self.min_steps), self.max_steps)
        # The in-flight units must all train within a fraction of one lease.
        fits = max(
            1, math.floor(self.lease_fraction * self.lease_seconds / (self.max_in_flight * step_s))
        )
        if steps > fits:
            log.info(
                "unit clamped to %d steps (wanted %d): at %.0f tokens/s, %d units in flight "
                "must train within %.0f%% of the %.0f s lease",
                fits, steps, tokens_per_s, self.max_in_flight, 100 * self.lease_fraction,
                self.lease_seconds,
            )  # fmt: skip
            steps = fits
        return steps


@dataclass
class UnitFactory:
    """Creates leases and the control messages that carry them."""

    cfg: PerspectiveConfig
    stage: int
    steps_per_unit: int
    docs_per_unit: int
    assignment: ColumnAssignment
    shards: list[tensor_pb2.BlobRef]
    eot_id: int
    blob_address: str
    token_key: bytes
    lease_seconds: float
    column_codec: str = "ternary"
    shared_codec: str = "ternary"
    teacher: tensor_pb2.BlobRef | None = None
    total_units_hint: int = 1000
    _counter: int = 0

    def lease(
        self, session, scheduler, participant, state, progress: float, steps: int | None = None
    ):
        """A unit for ``participant``: a re-queued one if any, else a new one.

        Args:
            session: the caller's transaction.
            scheduler: the :class:`~coordinator.scheduler.Scheduler` holding lease policy.
            participant: the ``Participant`` row to lease to.
            state: the coordinator state (its version is the unit's base).
            progress: fraction of the stage done (drives the lr / ternary schedules).
            steps: inner steps of a new unit (see :class:`UnitSizing`); ``None`` =
                ``steps_per_unit``. A re-queued unit keeps the steps it was created with.
        """
        queued = scheduler.next_queued(session, participant=participant, allow_foreign=True)
        if queued is not None:
            # Redone from the current version: the same columns, documents and steps.
            queued.base_version = state.version
            return queued
        columns = scheduler.assign_columns(
            session, participant=participant, n_columns=self.cfg.moe.n_experts
        )
        self._counter += 1
        seed = self._counter
        return scheduler.create_lease(
            session,
            participant=participant,
            stage=f"stage{self.stage}",
            base_version=state.version,
            columns=columns,
            docs=self._documents(columns, seed),
            steps=steps or self.steps_per_unit,
            params=self._params(progress, seed),
        )

    def _documents(self, columns: list[int], seed: int) -> list[str]:
        rng = np.random.default_rng([seed, 17])
        per_column = max(1, math.ceil(self.docs_per_unit / len(columns)))
        docs = []
        for c in columns:
            pool = self.assignment.documents(c)
            if pool:
                pick = rng.choice(pool, size=min(per_column, len(pool)), replace=False)
                docs += [f"{c}:{int(d)}" for d in sorted(pick)]
        return docs

    def _params(self, progress: float, seed: int) -> dict:
        steps = self.total_units_hint
        step = min(int(progress * steps), steps - 1)
        params = {"lr": lr_at(step, self.cfg.optim, steps), "seed": seed}
        if self.stage == 4:
            params["ternary_fraction"] = ternary_fraction_at(step, steps, self.cfg.ternary.schedule)
            params["kd_weight"] = self.cfg.ternary.kd_weight
        return params

    def request(self, unit, state, node_id: int) -> control_pb2.ControlRequest:
        """The control message for a leased unit (still attached to its session).

        Besides the unit it carries the sync chain, the batch shape, the codecs and the
        participant's credit so far (tokens of its accepted results), read from the
        ``participants`` table in the unit's own transaction.
        """
        params = unit.params or {}
        work = federation_pb2.WorkUnit(
            unit_id=unit.unit_id,
            base_version=unit.base_version,
            columns=list(unit.columns),
            document_ids=list(unit.docs),
            shard_ids=[s.content_id for s in self.shards],
            steps=unit.steps,
            lr=float(params.get("lr", self.cfg.optim.lr)),
            stage=STAGES[self.stage],
            ternary_fraction=float(params.get("ternary_fraction", 0.0)),
            kd_weight=float(params.get("kd_weight", 0.0)),
            shared_sync_every=unit.steps,
            train_shared=True,
            deadline_unix=int(unit.deadline.timestamp()),
            seed=int(params.get("seed", 0)),
            score_documents=bool(params.get("score", False)),  # coordinator/rescoring.py
        )
        quota = self._upload_quota(len(unit.columns))
        work.upload_quota_bytes = quota
        work.capability_token = issue_token(
            self.token_key,
            str(node_id),
            read_all=True,
            upload_quota=quota,
            ttl_s=2 * self.lease_seconds,
        )
        checkpoint, chain = state.publisher.chain_for(unit.base_version)
        req = control_pb2.ControlRequest(
            unit=work,
            checkpoint=checkpoint,
            versions=chain,
            blob_address=self.blob_address,
            batch_size=self.cfg.train.batch_size,
            seq_len=self.cfg.train.seq_len,
            column_codec=self.column_codec,
            shared_codec=self.shared_codec,
            eot_id=self.eot_id,
            budget_tokens=unit.steps * self.cfg.train.batch_size * self.cfg.train.seq_len,
            credit_tokens=self._credit(unit),
        )
        if self.teacher is not None:
            req.teacher.CopyFrom(self.teacher)
        return req

    @staticmethod
    def _credit(unit) -> int:
        session = object_session(unit)
        if session is None or unit.participant_id is None:
            return 0  # a detached unit (not from lease()): nothing to read the credit from
        return int(get_participant(session, participant_id=unit.participant_id).credit)

    def _upload_quota(self, n_columns: int) -> int:
        # Dense ternary is ~1.6 bits/param; allow 1 byte/param plus container overhead.
        counts = count_params(self.cfg)
        return n_columns * counts.column + counts.shared + counts.routers + (1 << 20)
