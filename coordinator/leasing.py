"""Leasing: which participant trains what, for how long, and the message that carries it.

Every participant is kept busy with column affinity (DESIGN §3):

* A participant never has fewer than ``max_in_flight`` (3) units in flight
  (:func:`leases_needed`), so it trains on the next unit while the previous result uploads.
* Affinity (:func:`assign_columns`): a participant keeps the expert columns it holds, so
  after the first download only deltas travel. New participants get the least-held
  columns, a number proportional to their measured throughput (capacity-balanced), 1 to
  ``max_columns``. With more participants than columns, columns are replicated.
* Leases expire at their deadline; the unit is re-queued as a copy with ``attempt + 1``
  for another participant, up to ``FederationSettings.max_attempts`` (the row work is
  :mod:`coordinator.db.leases`, which the federation loop calls directly).

A unit (:class:`UnitFactory`) trains the participant's columns on documents routed to
those columns, for H inner steps — the shared-layer sync period (20 in the prototype,
``notes/federated-prototype.md``). H is a property of each unit: fixed
(``steps_per_unit``), or sized by :class:`~coordinator.unit_sizing.UnitSizing` from the
participant's measured tokens/s so that every unit takes about ``unit_seconds`` of training
on any machine. A re-queued unit (expired or failed elsewhere) is handed out first, to any
participant (it may take columns it did not hold: they start from the published weights),
with its steps.

The Flower message carries only the :class:`ControlRequest`; the checkpoint, the version
chain and the training shards are blobs the participant fetches from the blob service
with the unit's capability token (read: everything published; write: a quota sized to
the expected upload). All durable state is in the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from coordinator import reply_fields
from coordinator.db import leases
from coordinator.db.errors import InvalidArgument, ParticipantRevoked
from coordinator.db.models import Participant, ParticipantColumn, WorkUnit
from coordinator.db.participants import (
    find_participant,
    get_participant,
    held_columns,
    set_held_columns,
)
from coordinator.db.types import ParticipantState, utcnow
from coordinator.plan.params import count_params
from coordinator.routing import unit_documents
from coordinator.routing.assignment import ColumnAssignment
from shared_model.blobs import issue_token
from shared_model.config import PerspectiveConfig
from shared_model.schedule import lr_at, ternary_fraction_at
from shared_model.wire.perspective.v1 import control_pb2, federation_pb2, tensor_pb2

log = logging.getLogger(__name__)

STAGES = {
    3: federation_pb2.STAGE_EXPERT_DIFFERENTIATION,
    4: federation_pb2.STAGE_TERNARY_DISTILLATION,
}


def leases_needed(
    session: Session, *, node_id: int, max_in_flight: int, now: dt.datetime | None = None
) -> int:
    """How many new units to lease to ``node_id`` now (0 if unknown or not online)."""
    participant = find_participant(session, node_id=node_id)
    if participant is None or participant.state != ParticipantState.ONLINE:
        return 0
    live = leases.count_in_flight(session, participant_id=participant.id, now=now or utcnow())
    return max(0, max_in_flight - live)


def _share(participant: Participant, others: list[Participant]) -> float:
    """This participant's fraction of the network's throughput (equal if unmeasured)."""
    speeds = [reply_fields.speed(p.tokens_per_s) for p in (participant, *others)]
    rates = [r for r in speeds if r]
    default = sum(rates) / len(rates) if rates else 1.0
    mine = speeds[0] or default
    total = mine + sum((r or default) for r in speeds[1:])
    return mine / total


def assign_columns(session: Session, *, participant: Participant, n_columns: int) -> list[int]:
    """Return the participant's columns, assigning new ones when it needs them.

    Sticky: held columns are kept (trimmed only if ``max_columns`` shrank). The
    target count is ``ceil(n_columns * throughput share)`` clamped to
    ``1..max_columns``; a newcomer takes that many of the least-held columns. A
    participant that holds columns only grows, into columns no online participant
    holds, as far as ``max_columns`` allows (so orphaned columns get re-covered).
    """
    if n_columns < 1:
        raise InvalidArgument(f"n_columns must be >= 1, got {n_columns}")
    if participant.state == ParticipantState.REVOKED:
        raise ParticipantRevoked(f"participant {participant.id} is revoked")
    mine = held_columns(session, participant_id=participant.id)
    mine = [c for c in mine if c < n_columns]
    others = session.scalars(
        select(Participant).where(
            Participant.state == ParticipantState.ONLINE, Participant.id != participant.id
        )
    ).all()
    target = max(
        1,
        min(participant.max_columns, n_columns, math.ceil(n_columns * _share(participant, others))),
    )
    holders: Counter[int] = Counter({c: 0 for c in range(n_columns)})
    other_ids = [p.id for p in others]
    for column in session.scalars(
        select(ParticipantColumn.column).where(ParticipantColumn.participant_id.in_(other_ids))
    ):
        if column < n_columns:
            holders[column] += 1
    keep = mine[: participant.max_columns]
    uncovered = [c for c in range(n_columns) if holders[c] == 0 and c not in keep]
    free = sorted((c for c in range(n_columns) if c not in keep), key=lambda c: (holders[c], c))
    if keep:
        # Affinity: never move. A column nobody holds is not trained at all, so a
        # participant that already holds columns grows into uncovered ones (left by
        # a departed node) as far as its capacity allows, beyond its fair share.
        # A newcomer takes only its share, so the first to join cannot grab all.
        free = uncovered
        target = max(target, min(participant.max_columns, len(keep) + len(uncovered)))
    chosen = sorted(keep + free[: max(0, target - len(keep))])
    set_held_columns(session, participant=participant, old=mine, new=chosen)
    return chosen


@dataclass
class UnitFactory:
    """Creates leases and the control messages that carry them.

    ``lease_seconds`` is the lease duration of every unit (and sets its token's lifetime).
    """

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
    column_codec: str
    shared_codec: str
    #: the ``ternary`` shared codec's threshold factor for participants' uploads
    shared_threshold: float
    #: Schedule length in inner steps, or a function of the unit's position and the
    #: stage's answer rate giving it (a time budget extrapolates it:
    #: ``StageBudget.schedule_steps``).
    schedule_steps: int | Callable[[int, leases.StageRate | None], int]
    teacher: tensor_pb2.BlobRef | None = None
    #: Inner steps the stage's token budget allows (``None``: no token budget). No new
    #: unit is created past it and the last one is cut to fit, so the network trains the
    #: budget's tokens, not the budget plus every unit in flight when it ran out.
    step_budget: int | None = None
    #: Column codec of units whose experts are all ternary (stage 4 at fraction 1;
    #: ``None``: ``column_codec``). Each unit's codec is in its params.
    ternary_column_codec: str | None = None
    #: ``ControlRequest.eager_scale``: how much of its own in-transit pseudo-gradients a
    #: participant adds to the start of its next unit (``eager_updates`` × its share of an
    #: outer step, outer lr / buffer size)
    eager_scale: float = 0.0
    #: ``ControlRequest.max_staleness``: the oldest base, in versions back, a result may
    #: have (``FederationSettings.max_staleness``); eager starts forget older results
    max_staleness: int = 0
    #: ``ControlRequest.network_id``: the database's id (:func:`coordinator.db.versions.
    #: network_id`); a node holding another network's state drops it
    network_id: str = ""
    #: In-unit shared syncs (``FederationSettings.shared_sync_every``; 0: off): a unit of
    #: more steps is leased as parts of this many, each syncing the shared layers; the
    #: columns go up with every ``round(steps / shared_sync_every)``-th part only.
    shared_sync_every: int = 0

    def lease(
        self,
        session: Session,
        participant: Participant,
        state,
        steps: int | None = None,
    ) -> WorkUnit | None:
        """A unit for ``participant``: a re-queued one if any, else a new one (``None``
        when the token budget is fully leased).

        Args:
            session: the caller's transaction.
            participant: the ``Participant`` row to lease to.
            state: the coordinator state (its version is the unit's base).
            steps: inner steps of a new unit (see
                :class:`~coordinator.unit_sizing.UnitSizing`); ``None`` = ``steps_per_unit``.
                A re-queued unit keeps the steps it was created with.

        Raises:
            ParticipantRevoked: the participant is revoked.
        """
        if participant.state == ParticipantState.REVOKED:
            raise ParticipantRevoked(f"participant {participant.id} is revoked")
        queued = leases.lease_queued(
            session,
            participant_id=participant.id,
            held_columns=held_columns(session, participant_id=participant.id),
            lease_seconds=self.lease_seconds,
            now=utcnow(),
            allow_foreign=True,
            stage=f"stage{self.stage}",
        )
        if queued is not None:
            # Redone from the current version: the same columns, documents and steps.
            queued.base_version = state.version
            return _claimed(session, queued)
        unit = self._new_unit(session, participant, state.version, steps)
        return _claimed(session, unit) if unit is not None else None

    def _new_unit(
        self, session: Session, participant: Participant, version: int, steps: int | None
    ) -> WorkUnit | None:
        """A new lease for ``participant`` at the stage's schedule position (``None`` once
        the step budget is fully leased); a part of ``steps`` with in-unit shared syncs."""
        # The schedules are indexed by the inner steps leased before this unit (from the
        # database, so a restart continues them; a re-queued copy keeps its own: lease).
        created, position = leases.stage_schedule_position(session, stage=f"stage{self.stage}")
        steps = steps or self.steps_per_unit
        parts = 1
        if 0 < self.shared_sync_every < steps:
            parts, steps = round(steps / self.shared_sync_every), self.shared_sync_every
        if self.step_budget is not None:
            if position >= self.step_budget:
                return None
            steps = min(steps, self.step_budget - position)
        columns = assign_columns(session, participant=participant, n_columns=self.cfg.moe.n_experts)
        # The run's seed (train.seed) picks documents and batches too, as in central training.
        seed = created + 1 + 1_000_003 * self.cfg.train.seed
        params = self._params(position, seed, session)
        if parts > 1:
            self._part_params(session, participant.id, parts, position, steps, params)
        return leases.create_lease(
            session,
            participant_id=participant.id,
            stage=f"stage{self.stage}",
            base_version=version,
            columns=columns,
            docs=self._documents(columns, seed),
            steps=steps,
            params=params,
            lease_seconds=self.lease_seconds,
        )

    def _part_params(
        self,
        session: Session,
        participant_id: int,
        parts: int,
        position: int,
        steps: int,
        params: dict,
    ) -> None:
        """Mark a new part (``params``: its schedule; in-unit shared syncs) as keeping its
        columns' training on the node (``hold_columns``), unless the node's last ``parts -
        1`` units all kept theirs or the stage is in its last tenth (every unit sends its
        columns, so the stage ends with every node's column training published). A part
        that sends them after parts that kept them gets ``column_steps``: the steps its
        column deltas carry, what the update bounds scale them by."""
        recent = leases.recent_units(
            session, participant_id=participant_id, stage=f"stage{self.stage}", limit=parts - 1
        )
        due = len(recent) == parts - 1 and all(p.get("hold_columns") for _, p in recent)
        if position < 0.9 * params["schedule_steps"] and not due:
            params["hold_columns"] = True
            return
        held = 0
        for unit_steps, unit_params in recent:  # newest first: the parts since the last send
            if not unit_params.get("hold_columns"):
                break
            held += unit_steps
        if held:
            params["column_steps"] = steps + held

    def _documents(self, columns: list[int], seed: int) -> list[str]:
        """About ``docs_per_unit`` documents routed to ``columns``, in their stored form."""
        rng = np.random.default_rng([seed, 17])
        per_column = max(1, math.ceil(self.docs_per_unit / len(columns)))
        pairs = []
        for c in columns:
            pool = self.assignment.documents(c)
            if pool:
                pick = rng.choice(pool, size=min(per_column, len(pool)), replace=False)
                pairs += [(c, int(d)) for d in sorted(pick)]
        return unit_documents.stored(pairs)

    def _params(self, position: int, seed: int, session: Session) -> dict:
        """Schedules at inner step ``position`` of the stage: what the central trainer uses
        at the same token position (warm-up and cosine counted in optimiser steps)."""
        step, total = self._schedule_step(position, session)
        params = {"lr": lr_at(step, self.cfg.optim, total), "seed": seed, "position": position}
        params["schedule_steps"] = total  # the length it was leased under (an estimate on time)
        params["column_codec"] = self.column_codec
        if self.stage == 4:
            fraction = ternary_fraction_at(step, total, self.cfg.ternary.schedule)
            params["ternary_fraction"], params["kd_weight"] = fraction, self.cfg.ternary.kd_weight
            if fraction >= 1.0 and self.ternary_column_codec:
                # All-ternary experts: their trits are the model, so they travel as trits.
                params["column_codec"] = self.ternary_column_codec
        return params

    def _schedule_step(self, position: int, session: Session) -> tuple[int, int]:
        total = self.schedule_steps
        if callable(total):
            total = total(position, leases.stage_rate(session, stage=f"stage{self.stage}"))
        return min(position, total - 1), total

    def ternary_fraction(self, session: Session, position: int) -> float:
        """Stage 4's share of ternary expert weights at inner step ``position``."""
        step, total = self._schedule_step(position, session)
        return ternary_fraction_at(step, total, self.cfg.ternary.schedule)

    def request(self, unit, state, node_id: int) -> control_pb2.ControlRequest:
        """The control message for a leased unit (still attached to its session).

        Besides the unit it carries the sync chain, the batch shape, the codecs and the
        participant's credit so far (tokens of its accepted results), read from the
        ``participants`` table in the unit's own transaction.
        """
        params = unit.params or {}
        work = self._work_unit(unit, params)
        quota = self._upload_quota(len(unit.columns))
        work.upload_quota_bytes = quota
        work.capability_token = issue_token(
            self.token_key,
            str(node_id),
            read_published=True,  # versions, shards, teacher; not others' uploads
            upload_quota=quota,
            ttl_s=2 * self.lease_seconds,
            token_id=unit.unit_id,  # uploads are bound to the lease (coordinator/blob_uploads)
        )
        held = _held_version(unit)
        checkpoint, chain = state.publisher.chain_for(unit.base_version, held)
        req = control_pb2.ControlRequest(
            unit=work,
            checkpoint=checkpoint,
            versions=chain,
            blob_address=self.blob_address,
            batch_size=self.cfg.train.batch_size,
            seq_len=self.cfg.train.seq_len,
            column_codec=params.get("column_codec", self.column_codec),
            shared_codec=self.shared_codec,
            shared_threshold=self.shared_threshold,
            eager_scale=self.eager_scale,
            max_staleness=self.max_staleness,
            network_id=self.network_id,
            eot_id=self.eot_id,
            budget_tokens=unit.steps * self.cfg.train.batch_size * self.cfg.train.seq_len,
            credit_tokens=self._credit(unit),
        )
        if self.teacher is not None:
            req.teacher.CopyFrom(self.teacher)
        return req

    def _work_unit(self, unit, params: dict) -> federation_pb2.WorkUnit:
        """The ``WorkUnit`` message of a leased unit: what it trains, from where, how."""
        return federation_pb2.WorkUnit(
            unit_id=unit.unit_id,
            base_version=unit.base_version,
            columns=list(unit.columns),
            documents=unit_documents.refs(unit.docs),
            shard_ids=[s.content_id for s in self.shards],
            steps=unit.steps,
            lr=float(params.get("lr", self.cfg.optim.lr)),
            expert_lr_scale=self.cfg.optim.expert_lr_scale,
            stage=STAGES[self.stage],
            ternary_fraction=float(params.get("ternary_fraction", 0.0)),
            kd_weight=float(params.get("kd_weight", 0.0)),
            shared_sync_every=unit.steps,
            hold_columns=bool(params.get("hold_columns", False)),
            fresh_columns=[int(c) for c in params.get("fresh_columns", ())],
            train_shared=True,
            deadline_unix=int(unit.deadline.timestamp()),
            seed=int(params.get("seed", 0)),
            score_documents=bool(params.get("score", False)),  # routing/rescoring.py
            # A unit queued behind another would otherwise train from a base one or more
            # versions old (measured on tiny: +0.09 validation loss at full weight).
            start_from_newest=True,
        )

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


def _claimed(session: Session, unit: WorkUnit) -> WorkUnit:
    """``unit`` with ``params["fresh_columns"]``: its columns the node must start from the
    published weights, because another node trained them since it last did
    (:func:`~coordinator.db.leases.claim_columns`; a re-queued copy is judged anew)."""
    fresh = leases.claim_columns(session, unit=unit)
    unit.params = {**(unit.params or {}), "fresh_columns": fresh}
    return unit


def _held_version(unit) -> int | None:
    """The version the participant's replica holds when it starts ``unit``: the base of
    the unit leased to it just before (units run in lease order); ``None`` if unknown."""
    session = object_session(unit)
    if session is None or unit.participant_id is None:
        return None
    return leases.previous_base_version(
        session, participant_id=unit.participant_id, before=unit.unit_id
    )
