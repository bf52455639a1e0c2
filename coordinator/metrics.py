"""Prometheus metrics of the coordinator (served at ``/metrics`` by the REST app).

The federation loop reports events as they happen through the module-level
:data:`METRICS` object, e.g.::

    from coordinator.metrics import METRICS

    METRICS.unit_leased(stage="expert_diff")
    METRICS.unit_completed(stage="expert_diff", tokens=4096, staleness=2)
    METRICS.unit_rejected(reason="NORM_OUT_OF_BOUNDS")
    with METRICS.time_aggregation():
        ...  # apply results, publish a version

Gauges that mirror the database (participants by state, units by state, the global
version) are refreshed from the database on every scrape by :meth:`refresh_from_db`,
so they are right even after a coordinator restart. Each :class:`CoordinatorMetrics`
owns its own registry: tests and several apps in one process never collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
DIRECTIONS = ("in", "out")


class CoordinatorMetrics:
    """Counters, gauges and histograms of one coordinator, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.units_leased = Counter(
            "perspective_units_leased", "Work units leased to participants", ["stage"], registry=r
        )
        self.units_completed = Counter(
            "perspective_units_completed", "Work units answered and accepted", ["stage"], registry=r
        )
        self.units_rejected = Counter(
            "perspective_units_rejected", "Results rejected, by reason code", ["reason"], registry=r
        )
        self.tokens = Counter(
            "perspective_tokens_trained", "Tokens in accepted results", registry=r
        )
        self.staleness = Histogram(
            "perspective_result_staleness_versions",
            "Versions between a result's base version and the version it was applied to",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.aggregation = Histogram(
            "perspective_aggregation_seconds",
            "Time to apply accepted results and publish a version",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.bytes = Counter(
            "perspective_bytes",
            "Bytes moved by the coordinator (in = uploads from participants, out = downloads)",
            ["direction"],
            registry=r,
        )
        self.db_latency = Histogram(
            "perspective_db_query_seconds",
            "Latency of database statements",
            ["operation"],
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.participants = Gauge(
            "perspective_participants", "Participants by state", ["state"], registry=r
        )
        self.units = Gauge("perspective_units", "Work units by state", ["state"], registry=r)
        self.global_version = Gauge(
            "perspective_global_version", "Latest published model version (-1: none)", registry=r
        )
        self.global_version.set(-1)
        self._instrumented: set[int] = set()

    # ------------------------------------------------------------ federation loop
    def unit_leased(self, *, stage: str, count: int = 1) -> None:
        """Count ``count`` units leased for ``stage``."""
        self.units_leased.labels(stage=stage).inc(count)

    def unit_completed(self, *, stage: str, tokens: int = 0, staleness: int | None = None) -> None:
        """Count an accepted result with its token count and (if known) staleness."""
        self.units_completed.labels(stage=stage).inc()
        if tokens:
            self.tokens.inc(tokens)
        if staleness is not None:
            self.staleness.observe(staleness)

    def unit_rejected(self, *, reason: str) -> None:
        """Count a rejected result by its reason code (e.g. ``"NORM_OUT_OF_BOUNDS"``)."""
        self.units_rejected.labels(reason=str(reason)).inc()

    def observe_staleness(self, versions: int) -> None:
        """Record the staleness of one applied result, in versions."""
        self.staleness.observe(versions)

    def observe_aggregation(self, seconds: float) -> None:
        """Record how long one aggregation + publish took."""
        self.aggregation.observe(seconds)

    @contextmanager
    def time_aggregation(self) -> Iterator[None]:
        """``with METRICS.time_aggregation(): ...`` records the block's duration."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.aggregation.observe(time.perf_counter() - start)

    def add_bytes(self, *, direction: str, count: int) -> None:
        """Add ``count`` bytes moved in ``direction`` (``"in"`` or ``"out"``)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if count < 0:
            raise ValueError(f"byte count must be >= 0, got {count}")
        self.bytes.labels(direction=direction).inc(count)

    def set_participants_online(self, count: int) -> None:
        """Set the number of online participants (also refreshed from the DB on scrape)."""
        self.participants.labels(state="online").set(count)

    def observe_db(self, *, operation: str, seconds: float) -> None:
        """Record one database statement's latency."""
        self.db_latency.labels(operation=operation).observe(seconds)

    # ------------------------------------------------------------------ plumbing
    def instrument_engine(self, engine: Any) -> None:
        """Time every statement run on a SQLAlchemy ``engine`` (idempotent)."""
        from sqlalchemy import event

        if id(engine) in self._instrumented:
            return
        self._instrumented.add(id(engine))

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn: Any, _cursor: Any, _stmt: str, _p: Any, _ctx: Any, _many: bool) -> None:
            conn.info.setdefault("perspective_t0", []).append(time.perf_counter())

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn: Any, _cursor: Any, stmt: str, _p: Any, _ctx: Any, _many: bool) -> None:
            starts = conn.info.get("perspective_t0")
            if starts:
                operation = stmt.lstrip().split(None, 1)[0].upper() if stmt.strip() else "?"
                self.observe_db(operation=operation, seconds=time.perf_counter() - starts.pop())

    def refresh_from_db(self, session: Any) -> None:
        """Set the database-mirroring gauges from ``session`` (called on each scrape)."""
        from coordinator.db import ParticipantState, UnitState
        from coordinator.db.stats import network_summary

        summary = network_summary(session)
        for state in ParticipantState:
            self.participants.labels(state=state.value).set(summary.participants.get(state, 0))
        for state in UnitState:
            self.units.labels(state=state.value).set(summary.units.get(state, 0))
        version = summary.global_version
        self.global_version.set(-1 if version is None else version)

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


METRICS = CoordinatorMetrics()
