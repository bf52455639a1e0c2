"""Result intake: the one path from a participant's upload to the masters.

Volunteers are untrusted (DESIGN §6). :meth:`Intake.receive` takes every result through
the same sequence, and the first check that fails decides (:func:`record_result`):

1. the unit exists (``UNKNOWN_LEASE``; nothing stored),
2. it is leased to this node and the node is not revoked (``WRONG_NODE``; nothing stored,
   so an impostor cannot occupy another node's answer slot),
3. it was not answered before (a replay: the stored outcome is returned, nothing changes),
4. the lease is live and of the running stage (``EXPIRED_LEASE``) and the result is built
   on the lease's base version (``BASE_MISMATCH``) —
   :func:`coordinator.db.leases.lease_problem`; a lease that expired (e.g. while the
   coordinator was down) is still judged when the result is built on its base, and its
   queued copy is withdrawn if it is accepted,
5. the payload (:class:`PayloadCheck`): the claimed tokens fit the unit (``MALFORMED``),
   the referenced blobs exist (``MISSING_BLOB``) and were uploaded under this very lease
   (``FOREIGN_BLOB``: no replays of accepted blobs, no borrowing another node's;
   :mod:`coordinator.blob_uploads`), the base is not too stale (``STALE_BASE``)
   — all before any blob is read — then are intact (``BAD_CHECKSUM``) and decode
   (``MALFORMED``), name exactly the unit's columns and the model's tensors with the right
   shapes (``BAD_SHAPE``), contain only finite values (``NON_FINITE``), have every
   tensor's norm within its bounds (``NORM_OUT_OF_BOUNDS``,
   :mod:`coordinator.aggregation.bounds`: relative to the tensor's own norm and to the
   median of recent updates per step size), and the participant's model must not be clearly
   worse than its base on held-out documents of each of its columns (``LOSS_INCREASE``,
   :mod:`coordinator.column_validation`).

The result row (with its blob ids, and a scoring unit's document losses) is committed
before the result is applied or acknowledged (:mod:`coordinator.db.results` writes it); a
rejected result stores its reason and changes nothing else. Then an accepted result is
applied to the masters. Application is deterministic given the order of results, which is
what lets a restarted coordinator replay the log exactly (:mod:`coordinator.federation`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from sqlalchemy.orm import Session

from coordinator import reply_fields
from coordinator.aggregation.bounds import OutOfBounds, UpdateBounds
from coordinator.aggregation.columns import StaleResultError
from coordinator.blob_uploads import UploadLedger
from coordinator.column_validation import ColumnValidator, ColumnWorse
from coordinator.db import leases as db_leases
from coordinator.db import results as db_results
from coordinator.db.models import WorkUnit
from coordinator.db.participants import find_participant
from coordinator.db.types import ParticipantState, RejectReason, UnitState, utcnow
from coordinator.metrics import METRICS
from coordinator.publishing import CoordinatorState
from shared_model.blobs import BlobCorrupt, BlobError, HashMismatch
from shared_model.codec import CodecError, ShapeMismatchError
from shared_model.federated.updates import (
    UPDATE_CODECS,
    BundleShapeError,
    UpdateError,
    read_bundle,
)
from shared_model.wire.perspective.v1 import federation_pb2

State = dict[str, torch.Tensor]
#: A claimed token count is stored clipped to this (over the unit's budget it is refused
#: anyway): far above any unit, and small enough that the totals summed over millions of
#: refused results still fit a BIGINT (a clip at 2^63 - 1 made SQLite's SUM overflow and
#: stopped serve, found by tests/test_hostile_serve.py).
MAX_STORED_TOKENS = 1 << 40
#: A claimed base version is stored clipped to this (BIGINT).
MAX_STORED_VERSION = 2**63 - 1
_CONTENT_ID = re.compile(r"[0-9a-f]{64}")


class Rejected(Exception):
    """Payload validation failed; carries the reason code stored with the result."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class DecodedResult:
    """A validated result's decoded updates."""

    base_version: int
    columns: dict[int, State] = field(default_factory=dict)
    shared: State = field(default_factory=dict)
    #: the codec the unit's columns travelled with (``None``: not known, any accepted)
    column_codec: str | None = None
    #: per-tensor update ratios (:meth:`UpdateBounds.check`), remembered once applied
    ratios: list[tuple[str, float]] = field(default_factory=list)
    #: columns the result named but that are not applied: FP updates of a unit trained
    #: after the stage's experts went ternary (:func:`fp_columns_outlived`)
    outlived: list[int] = field(default_factory=list)


def blob_ids(result: federation_pb2.WorkResult) -> dict:
    """The blob references of a result, as stored in the results table."""
    return {
        "columns": {str(d.column): d.delta.content_id for d in result.column_deltas},
        "shared": result.shared_update.blob.content_id,
    }


@dataclass(frozen=True)
class Received:
    """What became of one result (:meth:`Intake.receive`).

    Attributes:
        outcome: the decision, as the participant is told it.
        bytes_up: size of the blobs the result references (0 for missing ones).
        applied: accepted now (not a replay) and applied to the masters.
        stepped: applying it took an outer step: a version is due to be published.
    """

    outcome: db_results.RecordOutcome
    bytes_up: int
    applied: bool = False
    stepped: bool = False


class Intake:
    """The coordinator's one acceptance path: check, store and apply a result.

    Args:
        state: the masters results are decoded against and applied to.
        session_factory: ``sessionmaker``; each result is decided in one transaction.
        rescoring: the loop's :class:`~coordinator.routing.rescoring.Rescoring` (stores a scoring
            unit's document losses with its result).
        bounds: the per-tensor update bounds (it remembers accepted updates' sizes).
        validator: checks each column result on held-out documents (``None``: off).
        log: ``log(kind, message)`` for events outside the result's transaction.
        stage: the stage this intake serves (``"stage3"``): another stage's units are
            refused (``None``: any).
    """

    def __init__(
        self,
        state: CoordinatorState,
        session_factory,
        rescoring,
        *,
        bounds: UpdateBounds,
        validator: ColumnValidator | None,
        log: Callable[[str, str], None],
        stage: str | None = None,
    ) -> None:
        self.state, self.session_factory, self.rescoring = state, session_factory, rescoring
        self.bounds, self.validator, self.log = bounds, validator, log
        self.stage = stage

    def receive(self, node_id: int, result: federation_pb2.WorkResult) -> Received:
        """Check, store and apply one result (idempotent on replays of the same unit).

        A result whose application fails after it was stored as accepted (its base is
        older than the aggregator remembers; cannot happen within the staleness bound
        that :class:`PayloadCheck` enforces) is stored as rejected instead, so a restart
        does not try it again.
        """
        problem = result_problem(result, n_columns=len(self.state.columns.masters))
        ids = blob_ids(result) if problem is None else {"columns": {}, "shared": ""}
        bytes_up = sum(self._blob_size(c) for c in (*ids["columns"].values(), ids["shared"]))
        check = PayloadCheck(
            self.state,
            ids,
            self.bounds,
            self.validator,
            tokens=int(result.tokens),
            problem=problem,
        )
        with self.session_factory.begin() as s:
            outcome = record_result(
                s,
                unit_id=result.unit_id,
                node_id=node_id,
                payload=payload_of(result, bytes_up, ids),
                check_payload=check,
                newest=self.state.version,
                stage=self.stage,
            )
            scored = self.rescoring.record(s, check.unit, result, outcome)
        self.rescoring.observe(scored, self.log)
        if outcome.duplicate or not outcome.accepted or check.decoded is None:
            return Received(outcome, bytes_up)
        METRICS.observe_staleness(self.state.version - check.decoded.base_version)
        try:
            stepped = apply_result(self.state, check.decoded)
        except Rejected as exc:
            return Received(self._unaccept(outcome.unit_id, exc.reason, exc.detail), bytes_up)
        self.bounds.record(check.decoded.ratios)  # with rule-2 refusals (bounds.py)
        if check.decoded.outlived:
            self.log(
                "result.columns_outlived",
                f"unit {result.unit_id}: its columns {check.decoded.outlived} were trained "
                "as FP after the experts went ternary; its shared update is applied, its "
                "columns' training stays on its node",
            )
        return Received(outcome, bytes_up, applied=True, stepped=stepped)

    def refuse_unexpected(
        self, node_id: int, result: federation_pb2.WorkResult, error: BaseException
    ) -> db_results.RecordOutcome:
        """Store a refusal for a result whose checking failed unexpectedly (a bug, or a
        hostile payload that escaped a check, e.g. ``MemoryError``): ``MALFORMED`` with
        the error as the reason, so it is neither lost silently nor tried again.

        The lease checks still run first (an impostor's result is only logged); a result
        already stored as accepted but never applied is rejected instead.
        """
        detail = reply_fields.short(f"could not be checked: {type(error).__name__}: {error}")

        def fail(unit: WorkUnit) -> None:
            raise Rejected(RejectReason.MALFORMED, detail)

        with self.session_factory.begin() as s:
            outcome = record_result(
                s,
                unit_id=result.unit_id,
                node_id=node_id,
                payload=payload_of(result, 0, {"columns": {}, "shared": ""}),
                check_payload=fail,
            )
        if outcome.duplicate and outcome.accepted:
            return self._unaccept(outcome.unit_id, RejectReason.MALFORMED, detail)
        return outcome

    def _unaccept(self, unit_id: str, reason: RejectReason, detail: str):
        with self.session_factory.begin() as s:
            return db_results.reject_unapplied(s, unit_id=unit_id, reason=reason, detail=detail)

    def _blob_size(self, cid: str) -> int:
        try:
            return self.state.store.stat(cid).size
        except Exception:  # a missing blob is reported by validation, not here
            return 0


def record_result(
    session: Session,
    *,
    unit_id: str,
    node_id: int,
    payload: db_results.ResultPayload,
    check_payload: Callable[[WorkUnit], None] | None = None,
    now: dt.datetime | None = None,
    newest: int | None = None,
    stage: str | None = None,
) -> db_results.RecordOutcome:
    """Decide on a result and store the decision, all in the caller's one transaction.

    Runs the checks 1-5 of the module docstring in order; the first that fails decides.
    ``check_payload(unit)`` is step 5 (it raises :class:`Rejected`), called only when the
    lease checks pass. Accepted: unit ``done``, participant credit += tokens; rejected:
    the reason is stored (see :func:`coordinator.db.results.store_result`).

    Args:
        session: session inside the caller's transaction (commit, then acknowledge).
        unit_id: the lease answered.
        node_id: Flower node id the result came from.
        payload: token count, losses, blob ids, timings, claimed base version, bytes.
        check_payload: the payload checks (``None``: none, e.g. in database tests).
        now: current time (tests); defaults to ``utcnow()``.
        newest: the newest published version: a unit may have started from any version
            between its lease's base and this one (``WorkUnit.start_from_newest``).
        stage: the running stage (``"stage3"``); a unit of another one is refused as
            ``EXPIRED_LEASE`` (``None``: not checked, e.g. in database tests).

    Returns:
        The :class:`~coordinator.db.results.RecordOutcome` to report to the participant.
    """
    now = now or utcnow()
    found = _lease_and_holder(session, unit_id=unit_id, node_id=node_id)
    if isinstance(found, db_results.RecordOutcome):
        return found
    unit, participant = found
    existing = db_results.find_result(session, unit_id=unit_id)
    if existing is not None:
        return db_results.outcome_of(existing, duplicate=True)
    problem = _result_problem(unit, payload, check_payload, now=now, newest=newest, stage=stage)
    expired = unit.state == UnitState.EXPIRED
    outcome = db_results.store_result(
        session, unit=unit, participant=participant, payload=payload, problem=problem, now=now
    )
    if outcome.accepted and expired:  # a late answer, judged and accepted: no redo needed
        db_leases.withdraw_copy(session, unit=unit)
    return outcome


def _lease_and_holder(session: Session, *, unit_id: str, node_id: int):
    """Checks 1-2: the lease answered and its holder, ``(unit, participant)``; or the
    refusal already stored (no such lease, another node's, a revoked node's)."""
    unit = None
    if len(unit_id) <= reply_fields.UNIT_ID_CHARS:  # no unit of ours has a longer id
        unit = db_leases.find_unit(session, unit_id=unit_id)
    if unit is None:
        detail = f"no lease {reply_fields.short(unit_id, 40)!r} was issued"
        return db_results.refuse(
            session,
            unit_id=reply_fields.short(unit_id, reply_fields.UNIT_ID_CHARS),
            reason=RejectReason.UNKNOWN_LEASE,
            detail=detail,
            participant_id=None,
        )
    participant = find_participant(session, node_id=node_id)
    if participant is None or unit.participant_id != participant.id:
        return db_results.refuse(
            session,
            unit_id=unit_id,
            reason=RejectReason.WRONG_NODE,
            detail=f"lease {unit_id} is not held by node {node_id}",
            participant_id=None if participant is None else participant.id,
        )
    if participant.state == ParticipantState.REVOKED:
        return db_results.refuse(
            session,
            unit_id=unit_id,
            reason=RejectReason.WRONG_NODE,
            detail=f"node {node_id} is revoked",
            participant_id=participant.id,
        )
    return unit, participant


def _result_problem(
    unit: WorkUnit,
    payload: db_results.ResultPayload,
    check_payload: Callable[[WorkUnit], None] | None,
    *,
    now: dt.datetime,
    newest: int | None,
    stage: str | None,
) -> tuple[RejectReason, str] | None:
    """Checks 4-5 on a lease its holder answers for the first time: ``(reason, detail)``
    of the first that fails, or ``None``. A unit that passes the lease checks takes the
    base it says it trained from (before the payload checks, which read it)."""
    problem = db_leases.lease_problem(
        unit, base_version=payload.base_version, now=now, newest=newest
    )
    if problem is None and stage is not None and unit.stage != stage:
        # A late answer from the stage before (re-sent until acked): its update was trained
        # for that stage's model (no distillation, another ternary fraction).
        problem = (
            RejectReason.EXPIRED_LEASE,
            f"a {unit.stage} unit answered while {stage} runs",
        )
    if problem is None and payload.base_version is not None:
        # Started from a newer version than leased (start_from_newest): from here on, and
        # in the log a restart replays, the unit's base is the one it trained from.
        unit.base_version = payload.base_version
    if problem is None and check_payload is not None:
        try:
            check_payload(unit)
        except Rejected as exc:
            problem = (RejectReason(exc.reason), exc.detail)
    return problem


@dataclass
class PayloadCheck:
    """The payload checks of one result (step 5); keeps the unit and what it decoded.

    Attributes:
        state: the masters the updates must fit.
        ids: the result's blob ids (:func:`blob_ids`).
        bounds: the per-tensor update bounds.
        validator: the held-out check of column results (``None``: off).
        tokens: the token count the result claims (at most the unit's budget).
        problem: what :func:`result_problem` found wrong with the result's fields.
        unit: the unit checked against (set when called).
        decoded: the validated updates (set when every check passed).
    """

    state: CoordinatorState
    ids: dict
    bounds: UpdateBounds | None
    validator: ColumnValidator | None = None
    tokens: int = 0
    problem: Rejected | None = None
    unit: WorkUnit | None = None
    decoded: DecodedResult | None = None

    def __call__(self, unit: WorkUnit) -> None:
        """Check the payload against ``unit``.

        Raises:
            Rejected: with the reason code to store.
        """
        self.unit = unit
        if self.problem is not None:
            raise self.problem
        train = self.state.cfg.train
        budget = unit.steps * train.batch_size * train.seq_len
        if self.tokens > budget:  # credit and stage budgets count tokens: no inflated claims
            raise Rejected(
                RejectReason.MALFORMED,
                f"result claims {self.tokens} tokens; the unit's {unit.steps} steps are "
                f"{budget} tokens",
            )
        # Provenance before staleness: a replayed or borrowed upload is named as such on
        # the dashboard even when it also arrives too late (it is not a slow honest node).
        check_uploads(self.state.store, self.ids, unit.unit_id)
        stale = self.state.version - unit.base_version
        if stale > self.state.columns.max_staleness:
            raise Rejected(
                RejectReason.STALE_BASE,
                f"base version {unit.base_version} is {stale} versions old",
            )
        decoded = decode_result(
            self.state, self.ids, unit.base_version, db_leases.result_columns(unit), self.bounds,
            step_sizes=unit_step_sizes(self.bounds, unit) if self.bounds else (1.0, 1.0),
            column_codec=unit_column_codec(unit), fresh_columns=unit_fresh_columns(unit),
        )  # fmt: skip
        if self.validator is not None and decoded.columns:
            fraction = (unit.params or {}).get("ternary_fraction")  # stage 4: as trained
            try:
                self.validator.check_all(
                    decoded.columns, unit.base_version, decoded.shared, fraction=fraction
                )
            except ColumnWorse as exc:
                raise Rejected(RejectReason.LOSS_INCREASE, str(exc)) from exc
        self.decoded = decoded


def check_uploads(store, ids: dict, lease: str) -> None:
    """Every blob a result names exists and was first uploaded under its own lease
    (:mod:`coordinator.blob_uploads`); checked before anything is fetched or decoded.

    Raises:
        Rejected: ``MISSING_BLOB``, or ``FOREIGN_BLOB`` (a replay of an older result's
            blobs, or another node's upload).
    """
    ledger = UploadLedger.for_store(store)
    for cid in (*ids.get("columns", {}).values(), ids.get("shared", "")):
        if not cid or not store.has(cid):
            raise Rejected(RejectReason.MISSING_BLOB, f"blob {cid[:12]!r} is not in the store")
        uploader = ledger.uploader(cid)
        if uploader != lease:
            whose = "the coordinator" if uploader is None else f"lease {uploader}"
            raise Rejected(
                RejectReason.FOREIGN_BLOB,
                f"blob {cid[:12]} was uploaded by {whose}, not under lease {lease}",
            )


def decode_result(
    state: CoordinatorState,
    ids: dict,
    base_version: int,
    unit_columns: list[int],
    bounds: UpdateBounds | None,
    step_sizes: tuple[float, float] = (1.0, 1.0),
    column_codec: str | None = None,
    fresh_columns: Collection[int] = (),
) -> DecodedResult:
    """Fetch and decode a result's blobs from the coordinator's store, validating everything.

    ``bounds`` checks every tensor's size (``None``: not checked, for the replay of
    results accepted before a restart), relative to the unit's step sizes for its columns
    and its shared update (:func:`unit_step_sizes`). ``column_codec`` is the codec the unit
    named for its columns (:func:`unit_column_codec`): column tensors coded otherwise are
    refused, and trit-flip updates (``trits``) are measured against their own history, as
    are the columns the unit started from the published weights (``fresh_columns``,
    :func:`column_bounds_kind`).

    Raises:
        Rejected: with the reason code to store.
    """
    cols = {int(c): cid for c, cid in ids.get("columns", {}).items()}
    if sorted(cols) != sorted(unit_columns):
        raise Rejected(
            RejectReason.BAD_SHAPE, f"result has columns {sorted(cols)}, unit has {unit_columns}"
        )
    out = DecodedResult(base_version, column_codec=column_codec)
    if fp_columns_outlived(state, column_codec):
        out.outlived, cols = sorted(cols), {}
    references = {c: _column_reference(state, c, base_version) for c in cols}
    for column, cid in cols.items():
        expected = {k: tuple(v.shape) for k, v in state.columns.masters[column].items()}
        # A trits column decodes against the column as of the result's base.
        out.columns[column] = _decode(
            state, cid, "column", expected, references[column], column_codec
        )
    expected = {k: tuple(v.shape) for k, v in state.shared.master.items()}
    out.shared = _decode(state, ids.get("shared", ""), "shared", expected)
    if bounds is not None:
        columns, shared = step_sizes
        parts = [
            (column_bounds_kind(column_codec, c in fresh_columns), d, references[c], columns)
            for c, d in out.columns.items()
        ]
        parts.append(("shared", out.shared, state.shared.published, shared))
        for kind, update, reference, step_size in parts:
            try:
                ratios = bounds.check(kind, update, reference, step_size)
            except OutOfBounds as exc:
                raise Rejected(RejectReason.NORM_OUT_OF_BOUNDS, str(exc)) from exc
            out.ratios.extend(ratios)
    return out


def fp_columns_outlived(state: CoordinatorState, column_codec: str | None) -> bool:
    """Whether FP column updates (``column_codec`` not ``trits``) come too late to apply:
    the stage's experts are ternary already (stage 4 published its columns as trits).

    A node trains its units in the order their messages reach it, not the order they were
    leased in, so a unit of an earlier ternary phase can train after the node's units at
    fraction 1 were applied. Its column delta is then the node's FP latent minus the
    published ternary values (0.22 x the column's norm on ``tiny``, refused as out of
    bounds). Its shared update is applied as usual; its columns' training stays in the
    node's copy and goes up, as trits, with the node's next unit of them.
    """
    if state.publisher.teacher is None:  # not stage 4 (a stage-3 loop forgets the teacher)
        return False
    return column_codec not in (None, "trits") and state.publisher.column_codec == "trits"


def column_bounds_kind(column_codec: str | None, fresh: bool) -> str:
    """The update bounds' history a column update is measured against
    (:func:`~coordinator.aggregation.bounds.history_key`).

    Trit flips move a weight by its whole scale: not comparable with FP updates. A column
    started from the published weights (``WorkUnit.fresh_columns``) sends one unit's
    training; a column its owner carried on sends its copy's whole distance from the
    published one (its unsent codec residual, and the master's lag behind its copy when
    results came stale), a few times more. Where columns change hands often (more nodes
    than columns) the fresh ones are most of the history, and measured against them the
    carried-on copies of the same weights were refused as 4-6 x the median.
    """
    if column_codec == "trits":
        return "ternary column"
    return "fresh column" if fresh else "column"


def unit_fresh_columns(unit: WorkUnit) -> frozenset[int]:
    """The columns ``unit`` starts from the published weights (``WorkUnit.fresh_columns``,
    :func:`~coordinator.db.leases.claim_columns`)."""
    return frozenset(int(c) for c in (unit.params or {}).get("fresh_columns", []))


def unit_column_codec(unit: WorkUnit) -> str | None:
    """The codec the unit asked for its columns (``None``: a unit leased before units
    named it; any update codec is read)."""
    codec = (unit.params or {}).get("column_codec")
    return codec if codec in UPDATE_CODECS else None


def unit_step_sizes(bounds: UpdateBounds, unit: WorkUnit) -> tuple[float, float]:
    """The step sizes (:meth:`UpdateBounds.step_size`) of ``unit``'s column deltas and of
    its shared update: what an honest update's size grows with. The shared update is
    this unit's training; the columns carry every part's since the node last sent them
    (in-unit shared syncs: ``params["column_steps"]``, the parts that held them too)."""
    params = unit.params or {}
    lr = params.get("lr")
    lr = float(lr) if isinstance(lr, int | float) else None
    column_steps = params.get("column_steps")
    if not isinstance(column_steps, int) or column_steps < unit.steps:
        column_steps = unit.steps
    return bounds.step_size(lr, column_steps), bounds.step_size(lr, int(unit.steps))


def _column_reference(state: CoordinatorState, column: int, base_version: int) -> State:
    """The weights a column delta is measured against: the column as of its base."""
    try:
        return state.columns.published_at(column, base_version)
    except StaleResultError as exc:
        raise Rejected(RejectReason.STALE_BASE, str(exc)) from exc


def _decode(
    state: CoordinatorState,
    cid: str,
    kind: str,
    expected: dict,
    base: State | None = None,
    codec: str | None = None,
) -> State:
    try:
        data = state.store.get(cid, verify=True)
    except (BlobCorrupt, HashMismatch) as exc:
        raise Rejected(RejectReason.BAD_CHECKSUM, f"{kind} blob {cid[:12]}: {exc}") from exc
    except BlobError as exc:
        raise Rejected(RejectReason.MISSING_BLOB, f"{kind} blob {cid[:12]}: {exc}") from exc
    try:
        _, tensors = read_bundle(data, kind=kind, expected=expected, base=base, codec=codec)
    except (BundleShapeError, ShapeMismatchError) as exc:  # container vs. our tensor
        raise Rejected(RejectReason.BAD_SHAPE, f"{kind} bundle: {exc}") from exc
    except (UpdateError, CodecError) as exc:
        raise Rejected(RejectReason.MALFORMED, f"{kind} bundle: {exc}") from exc
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise Rejected(RejectReason.BAD_SHAPE, f"{kind} bundle lacks {missing[:3]}")
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise Rejected(RejectReason.NON_FINITE, f"{kind} tensor {name} has NaN/Inf")
    return tensors


def apply_result(state: CoordinatorState, decoded: DecodedResult, step: bool = True) -> bool:
    """Apply a validated result to the masters; returns True if an outer step was taken.

    Args:
        step: take the outer step when the buffer is full (False: only buffer, for replay).

    Raises:
        Rejected: the base version is older than the aggregator remembers.
    """
    try:
        for column, delta in decoded.columns.items():
            state.columns.apply(column, delta, decoded.base_version, state.version)
    except StaleResultError as exc:
        raise Rejected(RejectReason.STALE_BASE, str(exc)) from exc
    if decoded.column_codec == "trits" and decoded.columns:  # the experts are ternary now
        state.use_column_codec("trits")
    return state.shared.add(decoded.shared, decoded.base_version, state.version, step=step)


def result_problem(result: federation_pb2.WorkResult, *, n_columns: int) -> Rejected | None:
    """What is wrong with a result's blob references before anything is fetched: more
    column deltas than the model has columns, or ids that are not content ids."""
    if len(result.column_deltas) > n_columns:
        return Rejected(
            RejectReason.MALFORMED,
            f"result names {len(result.column_deltas)} column deltas; the model has "
            f"{n_columns} columns",
        )
    refs = [d.delta.content_id for d in result.column_deltas]
    for cid in (*refs, result.shared_update.blob.content_id):
        if cid and not _CONTENT_ID.fullmatch(cid):  # an empty one is MISSING_BLOB
            return Rejected(
                RejectReason.MALFORMED,
                f"blob reference {reply_fields.short(cid, 70)!r} is not a sha256 content id",
            )
    return None


def payload_of(
    result: federation_pb2.WorkResult, bytes_up: int, ids: dict | None = None
) -> db_results.ResultPayload:
    """The DB summary of a result, every field made to fit its column
    (:mod:`coordinator.reply_fields`); ``ids``: the blob ids to store (default: the
    result's own)."""
    return db_results.ResultPayload(
        tokens=min(int(result.tokens), MAX_STORED_TOKENS),  # fits BIGINT (refused if > unit)
        train_loss=reply_fields.finite(result.train_loss),
        val_loss=reply_fields.finite(result.val_loss) if result.val_loss else None,
        blob_ids=blob_ids(result) if ids is None else ids,
        timings=reply_fields.timings(result.timings),
        base_version=min(int(result.base_version), MAX_STORED_VERSION),
        bytes_up=bytes_up,
    )
