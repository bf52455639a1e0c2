"""Read-only queries for the REST API and dashboard: listings and aggregated statistics.

Nothing here writes. Every function takes a session and returns plain rows or frozen
dataclasses, so the API layer only has to serialise them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator.db.leases import result_columns
from coordinator.db.models import (
    ModelVersion,
    Participant,
    Result,
    StageJob,
    WorkUnit,
)
from coordinator.db.pagination import Page, check_page
from coordinator.db.types import ParticipantState, ResultState, StageJobState, UnitState
from coordinator.db.versions import latest_version


def list_units(
    session: Session,
    *,
    state: UnitState | None = None,
    participant_id: int | None = None,
    stage: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> Page[WorkUnit]:
    """Work units, newest first, optionally filtered by state, participant and stage."""
    check_page(offset, limit)
    query = select(WorkUnit)
    if state is not None:
        query = query.where(WorkUnit.state == UnitState(state))
    if participant_id is not None:
        query = query.where(WorkUnit.participant_id == participant_id)
    if stage is not None:
        query = query.where(WorkUnit.stage == stage)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    order = (WorkUnit.created_at.desc(), WorkUnit.unit_id)
    rows = session.scalars(query.order_by(*order).offset(offset).limit(limit)).all()
    return Page(items=list(rows), total=total, offset=offset, limit=limit)


def find_unit(session: Session, *, unit_id: str) -> WorkUnit | None:
    """The unit with this id without taking a row lock (for read endpoints)."""
    return session.get(WorkUnit, unit_id)


def list_results(
    session: Session,
    *,
    state: ResultState | None = None,
    participant_id: int | None = None,
    reject_reason: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> Page[Result]:
    """Stored results, newest first, optionally filtered."""
    check_page(offset, limit)
    query = select(Result)
    if state is not None:
        query = query.where(Result.state == ResultState(state))
    if participant_id is not None:
        query = query.where(Result.participant_id == participant_id)
    if reject_reason is not None:
        query = query.where(Result.reject_reason == reject_reason)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    order = (Result.received_at.desc(), Result.id.desc())
    rows = session.scalars(query.order_by(*order).offset(offset).limit(limit)).all()
    return Page(items=list(rows), total=total, offset=offset, limit=limit)


def reject_counts(session: Session, *, participant_id: int | None = None) -> dict[str, int]:
    """Number of rejected results per reason code (all participants, or one)."""
    query = select(Result.reject_reason, func.count()).where(Result.state == ResultState.REJECTED)
    if participant_id is not None:
        query = query.where(Result.participant_id == participant_id)
    rows = session.execute(query.group_by(Result.reject_reason)).all()
    return {str(reason): int(count) for reason, count in rows}


@dataclass(frozen=True)
class NetworkSummary:
    """The network at a glance (the dashboard header and ``GET /api/v1/status``)."""

    stage: str | None
    stage_job_id: int | None
    stage_job_state: str | None
    global_version: int | None
    version_created_at: dt.datetime | None
    tokens_trained: int
    latest_val_loss: float | None
    latest_train_loss: float | None
    participants: dict[str, int] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    busy_participants: int = 0


def _counts(session: Session, column: Any) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).group_by(column)).all()
    return {str(key): int(count) for key, count in rows}


def _current_job(session: Session) -> StageJob | None:
    # The job an operator cares about: a live one if any, else the most recent one.
    live = (StageJobState.RUNNING, StageJobState.PAUSED, StageJobState.QUEUED)
    job = session.scalar(
        select(StageJob).where(StageJob.state.in_(live)).order_by(StageJob.id.desc()).limit(1)
    )
    return job or session.scalar(select(StageJob).order_by(StageJob.id.desc()).limit(1))


def _newest_evaluated(session: Session, window: int = 500) -> float | None:
    """Validation loss of the newest version that was evaluated (every ``eval_every``
    versions, so the latest one usually has none); looks at the last ``window`` versions."""
    rows = session.scalars(
        select(ModelVersion.metrics).order_by(ModelVersion.version.desc()).limit(window)
    )
    for metrics in rows:
        value = (metrics or {}).get("val_loss")
        if isinstance(value, int | float):
            return float(value)
    return None


def _latest_losses(session: Session, version: ModelVersion | None) -> tuple[float | None, ...]:
    metrics = version.metrics if version is not None else {}
    val, train = _newest_evaluated(session), metrics.get("train_loss")
    if val is None or train is None:
        row = session.execute(
            select(Result.val_loss, Result.train_loss)
            .where(Result.state == ResultState.ACCEPTED)
            .order_by(Result.received_at.desc(), Result.id.desc())
            .limit(1)
        ).first()
        if row is not None:
            val = val if val is not None else row[0]
            train = train if train is not None else row[1]
    return (None if val is None else float(val), None if train is None else float(train))


def network_summary(session: Session) -> NetworkSummary:
    """Aggregate the current state of the network from the database."""
    job = _current_job(session)
    version = latest_version(session)
    tokens = session.scalar(
        select(func.coalesce(func.sum(Result.tokens), 0)).where(
            Result.state == ResultState.ACCEPTED
        )
    )
    up, down = session.execute(
        select(
            func.coalesce(func.sum(Participant.bytes_up), 0),
            func.coalesce(func.sum(Participant.bytes_down), 0),
        )
    ).one()
    busy = session.scalar(
        select(func.count(func.distinct(WorkUnit.participant_id))).where(
            WorkUnit.state == UnitState.LEASED
        )
    )
    val, train = _latest_losses(session, version)
    participants = {s.value: 0 for s in ParticipantState} | _counts(session, Participant.state)
    return NetworkSummary(
        stage=job.stage if job is not None else (version.stage if version else None),
        stage_job_id=None if job is None else job.id,
        stage_job_state=None if job is None else job.state,
        global_version=None if version is None else version.version,
        version_created_at=None if version is None else version.created_at,
        tokens_trained=int(tokens or 0),
        latest_val_loss=val,
        latest_train_loss=train,
        participants=participants,
        units={s.value: 0 for s in UnitState} | _counts(session, WorkUnit.state),
        results={s.value: 0 for s in ResultState} | _counts(session, Result.state),
        bytes_up=int(up or 0),
        bytes_down=int(down or 0),
        busy_participants=int(busy or 0),
    )


@dataclass(frozen=True)
class VersionPoint:
    """One published version on the charts' time axis."""

    version: int
    created_at: dt.datetime
    stage: str | None
    metrics: dict[str, Any]
    tokens_applied: int
    tokens_cumulative: int


@dataclass(frozen=True)
class ResultPoint:
    """One stored result on the charts' time axis."""

    received_at: dt.datetime
    participant_id: int | None
    state: str
    reject_reason: str | None
    tokens: int
    train_loss: float | None
    val_loss: float | None


def version_history(session: Session, *, limit: int = 500) -> list[VersionPoint]:
    """The newest ``limit`` versions, oldest first, with tokens applied per version."""
    check_page(0, limit)
    applied = dict(
        session.execute(
            select(Result.applied_in_version, func.sum(Result.tokens))
            .where(Result.applied_in_version.is_not(None))
            .group_by(Result.applied_in_version)
        ).all()
    )
    rows = session.scalars(
        select(ModelVersion).order_by(ModelVersion.version.desc()).limit(limit)
    ).all()
    rows = list(reversed(rows))
    if rows:
        first = rows[0].version
        before = sum(int(t or 0) for v, t in applied.items() if v is not None and v < first)
    else:
        before = 0
    points, cumulative = [], before
    for row in rows:
        tokens = int(applied.get(row.version) or 0)
        cumulative += tokens
        points.append(
            VersionPoint(
                version=row.version,
                created_at=row.created_at,
                stage=row.stage,
                metrics=dict(row.metrics or {}),
                tokens_applied=tokens,
                tokens_cumulative=cumulative,
            )
        )
    return points


def result_history(session: Session, *, limit: int = 500) -> list[ResultPoint]:
    """The newest ``limit`` results, oldest first."""
    check_page(0, limit)
    rows = session.scalars(
        select(Result).order_by(Result.received_at.desc(), Result.id.desc()).limit(limit)
    ).all()
    return [
        ResultPoint(
            received_at=r.received_at,
            participant_id=r.participant_id,
            state=r.state,
            reject_reason=r.reject_reason,
            tokens=int(r.tokens or 0),
            train_loss=r.train_loss,
            val_loss=r.val_loss,
        )
        for r in reversed(rows)
    ]


def credit_leaderboard(session: Session, *, limit: int = 20) -> list[Participant]:
    """Participants with the most credit (accepted tokens), best first."""
    check_page(0, limit)
    query = select(Participant).order_by(Participant.credit.desc(), Participant.id).limit(limit)
    return list(session.scalars(query).all())


@dataclass(frozen=True)
class StageTotals:
    """Running totals of one stage, read from the result log (the only place they live)."""

    accepted: int = 0
    rejected: int = 0
    tokens: int = 0
    bytes_up: int = 0
    train_s: float = 0.0
    unit_s: float = 0.0


def stage_totals(session: Session, *, stage: str, timings: bool = False) -> StageTotals:
    """Totals of results for units of ``stage`` (e.g. ``"stage3"``).

    A restarted coordinator continues the stage's budget from here. ``timings`` also sums
    the accepted results' ``train_s`` / ``total_s`` (one row read per result: for reports,
    not for every loop step).
    """
    by_state = {
        state: (int(n), int(tokens), int(up))
        for state, n, tokens, up in session.execute(
            select(
                Result.state,
                func.count(Result.id),
                func.coalesce(func.sum(Result.tokens), 0),
                func.coalesce(func.sum(Result.bytes_up), 0),
            )
            .join(WorkUnit, WorkUnit.unit_id == Result.unit_id)
            .where(WorkUnit.stage == stage)
            .group_by(Result.state)
        )
    }
    accepted, tokens, up_ok = by_state.get(ResultState.ACCEPTED, (0, 0, 0))
    rejected, _, up_bad = by_state.get(ResultState.REJECTED, (0, 0, 0))
    train_s = unit_s = 0.0
    if timings:
        for (t,) in _accepted_in(session, stage, Result.timings):
            train_s += float((t or {}).get("train_s", 0.0))
            unit_s += float((t or {}).get("total_s", 0.0))
    return StageTotals(accepted, rejected, tokens, up_ok + up_bad, train_s, unit_s)


@dataclass(frozen=True)
class MetricTotals:
    """The totals ``/metrics`` exports as counters, all read from the database."""

    units_leased: dict[str, int]
    units_accepted: dict[str, int]
    rejected: dict[str, int]
    tokens: int
    bytes_up: int
    bytes_down: int


def metric_totals(session: Session, *, summary: NetworkSummary) -> MetricTotals:
    """Units leased / accepted by stage and rejections by reason; tokens and traffic are
    the ``summary``'s (:func:`network_summary`, already read for the same scrape)."""
    leased = session.execute(
        select(WorkUnit.stage, func.count(WorkUnit.unit_id))
        .where(WorkUnit.participant_id.is_not(None))
        .group_by(WorkUnit.stage)
    )
    accepted = session.execute(
        select(WorkUnit.stage, func.count(Result.id))
        .join(WorkUnit, WorkUnit.unit_id == Result.unit_id)
        .where(Result.state == ResultState.ACCEPTED)
        .group_by(WorkUnit.stage)
    )
    return MetricTotals(
        units_leased={str(s): int(n) for s, n in leased},
        units_accepted={str(s): int(n) for s, n in accepted},
        rejected=reject_counts(session),
        tokens=summary.tokens_trained,
        bytes_up=summary.bytes_up,
        bytes_down=summary.bytes_down,
    )


def _accepted_in(session: Session, stage: str, *columns):
    """``columns`` (of ``WorkUnit`` / ``Result``) of every accepted result of ``stage``."""
    return session.execute(
        select(*columns)
        .select_from(Result)
        .join(WorkUnit, WorkUnit.unit_id == Result.unit_id)
        .where(WorkUnit.stage == stage, Result.state == ResultState.ACCEPTED)
    ).all()


def accepted_unit_columns(session: Session, *, stage: str) -> list[int]:
    """How many columns each accepted result of ``stage`` carried (what one sync moves):
    none for a part that held its columns (in-unit shared syncs: it synced the shared
    layers only)."""
    return [len(result_columns(unit)) for (unit,) in _accepted_in(session, stage, WorkUnit)]


def accepted_column_codecs(session: Session, *, stage: str) -> dict[str, int]:
    """Accepted results of ``stage`` per column codec their units named (stage 4: ``trits``
    once the experts are all ternary); units from before units named one are left out."""
    out: dict[str, int] = {}
    for (params,) in _accepted_in(session, stage, WorkUnit.params):
        codec = (params or {}).get("column_codec")
        if codec:
            out[codec] = out.get(codec, 0) + 1
    return dict(sorted(out.items()))


def utilisation_by_participant(session: Session, *, stage: str, wall_s: float) -> dict[str, float]:
    """Training / wall per participant (id as a string, sorted): the seconds it reported
    training (``timings.train_s``) in accepted results of ``stage``, over ``wall_s``, the
    stage's wall time. Empty when ``wall_s`` is not positive."""
    if wall_s <= 0:
        return {}
    out: dict[int, float] = {}
    for pid, t in _accepted_in(session, stage, Result.participant_id, Result.timings):
        out[pid] = out.get(pid, 0.0) + float((t or {}).get("train_s", 0.0))
    return {str(p): t / wall_s for p, t in sorted(out.items())}


def result_staleness(session: Session, *, stage: str) -> dict[str, Any]:
    """How stale the accepted results of ``stage`` were: the versions published between a
    result's base and the version it went into, not counting that one (0: nothing was
    published while its unit trained). ``{"mean": ..., "share": {"0": ..., ...},
    "eager": ...}`` (``eager``: the share whose unit started from its node's results on
    their way, eager updates), or empty when none was applied yet."""
    rows = [
        (int(applied) - int(base) - 1, int((timings or {}).get("eager_results", 0)) > 0)
        for base, applied, timings in _accepted_in(
            session, stage, Result.base_version, Result.applied_in_version, Result.timings
        )
        if applied is not None
    ]
    if not rows:
        return {}
    values = [v for v, _ in rows]
    share = {str(v): values.count(v) / len(values) for v in sorted(set(values))}
    eager = sum(e for _, e in rows) / len(rows)
    return {"mean": sum(values) / len(values), "share": share, "eager": eager}


def trained_schedule(session: Session, *, stage: str) -> dict[str, Any]:
    """The lr and ternary schedule the accepted results of ``stage`` trained at, against
    the stage's time: seconds from its first lease to each answer. ``{"seconds": ...,
    "lr_max": ..., "lr_last": ..., "phases": {"0.25": {"units": n, "answered_s": [first,
    last]}, ...}}`` (``phases``: stage 4's ternary fractions, empty for stage 3), or empty
    when nothing was accepted."""
    start = session.execute(
        select(func.min(WorkUnit.leased_at)).where(WorkUnit.stage == stage)
    ).scalar_one()
    rows = sorted(
        ((finished - start).total_seconds(), params or {})
        for finished, params in _accepted_in(session, stage, WorkUnit.finished_at, WorkUnit.params)
        if finished is not None
    )
    if start is None or not rows:
        return {}
    phases: dict[str, dict[str, Any]] = {}
    for seconds, params in rows:
        if "ternary_fraction" in params:
            phase = phases.setdefault(str(params["ternary_fraction"]), {"units": 0})
            phase["units"] += 1
            phase.setdefault("answered_s", [seconds, seconds])[1] = seconds
    lrs = [float(p["lr"]) for _, p in rows if "lr" in p]
    return {
        "seconds": rows[-1][0],
        "lr_max": max(lrs, default=None),
        "lr_last": lrs[-1] if lrs else None,
        "phases": dict(sorted(phases.items())),
    }
