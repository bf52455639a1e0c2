"""Network status and chart series."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from coordinator.api.deps import DbSession, Reader
from coordinator.api.schemas import (
    MetricsHistoryOut,
    ResultPointOut,
    StatusOut,
    VersionPointOut,
)
from coordinator.db import ParticipantState, ResultState
from coordinator.db.stats import network_summary, result_history, version_history

router = APIRouter(tags=["status"], dependencies=[Reader])


@router.get("/status", response_model=StatusOut, summary="Network status")
def get_status(session: DbSession) -> StatusOut:
    """Stage, global version, tokens trained, latest losses, participants, traffic."""
    s = network_summary(session)
    return StatusOut(
        **{k: getattr(s, k) for k in StatusOut.model_fields if hasattr(s, k)},
        participants_online=s.participants.get(ParticipantState.ONLINE, 0),
    )


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


@router.get("/metrics/history", response_model=MetricsHistoryOut, summary="Chart series")
def get_history(
    session: DbSession,
    versions: Annotated[int, Query(ge=1, le=1000)] = 500,
    results: Annotated[int, Query(ge=1, le=1000)] = 500,
) -> MetricsHistoryOut:
    """Versions over time (val/train loss from their metrics, tokens applied) and results."""
    vpoints = version_history(session, limit=versions)
    rpoints = result_history(session, limit=results)
    accepted = [r for r in rpoints if r.state == ResultState.ACCEPTED]
    rate, window = None, None
    if len(accepted) >= 2:
        window = (accepted[-1].received_at - accepted[0].received_at).total_seconds()
        if window > 0:
            rate = sum(r.tokens for r in accepted[1:]) / window
    return MetricsHistoryOut(
        versions=[
            VersionPointOut(
                version=p.version,
                created_at=p.created_at,
                stage=p.stage,
                val_loss=_float(p.metrics.get("val_loss")),
                train_loss=_float(p.metrics.get("train_loss")),
                tokens_applied=p.tokens_applied,
                tokens_cumulative=p.tokens_cumulative,
                metrics=p.metrics,
            )
            for p in vpoints
        ],
        results=[ResultPointOut(**vars(r)) for r in rpoints],
        tokens_per_s=rate,
        window_s=window,
    )
