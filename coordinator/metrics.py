"""Prometheus metrics of the coordinator (served at ``/metrics`` by the REST app).

Totals are counted once, in the database: units leased and accepted by stage, rejections
by reason, tokens, bytes in and out are read from it on every scrape
(:func:`coordinator.db.stats.metric_totals`, via :meth:`CoordinatorMetrics.refresh_from_db`)
and exported as counters, so they equal the database's totals and survive a restart.
Gauges (participants and units by state, the global version) are refreshed the same way.
What the database does not hold is observed as it happens through the module-level
:data:`METRICS` object: the staleness of each applied result (intake), the time of each
aggregation + publish, each lease, each unit reply's intake and each loop step (the
federation loop) and database statement latency.
Each :class:`CoordinatorMetrics` owns its own registry: tests and several apps in one
process never collide.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class CoordinatorMetrics:
    """Counters, gauges and histograms of one coordinator, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._totals = _DatabaseTotals()
        r.register(self._totals)
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
        self.lease = Histogram(
            "perspective_lease_seconds",
            "Time to lease one unit to a node (database and unit construction)",
            buckets=DB_BUCKETS,
            registry=r,
        )
        self.intake = Histogram(
            "perspective_intake_seconds",
            "Time to take one unit's reply (decode, checks, aggregation, database, and the "
            "version it completes: publishing, evaluation, checkpoint)",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.loop_step = Histogram(
            "perspective_loop_step_seconds",
            "One federation loop iteration (leases, liveness, waiting for replies up to 0.2 s)",
            buckets=SECONDS_BUCKETS,
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
    def observe_staleness(self, versions: int) -> None:
        """Record the staleness of one applied result, in versions."""
        self.staleness.observe(versions)

    def observe_aggregation(self, seconds: float) -> None:
        """Record how long one aggregation + publish took."""
        self.aggregation.observe(seconds)

    @contextmanager
    def time_aggregation(self) -> Iterator[None]:
        """``with METRICS.time_aggregation(): ...`` records the block's duration."""
        with self.timed(self.aggregation):
            yield

    @staticmethod
    @contextmanager
    def timed(histogram: Histogram) -> Iterator[None]:
        """``with METRICS.timed(METRICS.lease): ...`` records the block's duration."""
        start = time.perf_counter()
        try:
            yield
        finally:
            histogram.observe(time.perf_counter() - start)

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
        """Read the totals and gauges from ``session`` (called on each scrape)."""
        from coordinator.db import ParticipantState, UnitState
        from coordinator.db.stats import metric_totals, network_summary

        summary = network_summary(session)
        self._totals.snapshot = metric_totals(session, summary=summary)
        for state in ParticipantState:
            self.participants.labels(state=state.value).set(summary.participants.get(state, 0))
        for state in UnitState:
            self.units.labels(state=state.value).set(summary.units.get(state, 0))
        version = summary.global_version
        self.global_version.set(-1 if version is None else version)

    def render(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _DatabaseTotals(Collector):
    """Counters whose values are the database's totals at the last refresh."""

    def __init__(self) -> None:
        self.snapshot: Any = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        t = self.snapshot
        families = [
            ("perspective_units_leased", "Work units leased to participants", ["stage"],
             {} if t is None else {(k,): v for k, v in t.units_leased.items()}),
            ("perspective_units_completed", "Work units answered and accepted", ["stage"],
             {} if t is None else {(k,): v for k, v in t.units_accepted.items()}),
            ("perspective_units_rejected", "Results rejected, by reason code", ["reason"],
             {} if t is None else {(k,): v for k, v in t.rejected.items()}),
            ("perspective_tokens_trained", "Tokens in accepted results", [],
             {(): 0 if t is None else t.tokens}),
            ("perspective_bytes", "Bytes moved by the coordinator (in = uploads from "
             "participants, out = downloads they reported)", ["direction"],
             {} if t is None else {("in",): t.bytes_up, ("out",): t.bytes_down}),
        ]  # fmt: skip
        for name, doc, labels, values in families:
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, value in values.items():
                family.add_metric(list(key), value)
            yield family


METRICS = CoordinatorMetrics()
