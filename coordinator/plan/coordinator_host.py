"""The coordinator's own RAM, disk and bandwidth in a federated stage, per fleet size.

What the coordinator holds *as built today* (one process, ``coordinator/aggregation/``):

* **column masters** in FP32 (``ColumnAggregator.masters``) and, for the staleness window,
  up to ``max_staleness + 1`` published copies of each column (``_published``);
* **shared layers**: the FP32 master, the published copy and the outer optimiser's
  momentum, plus the **buffer** of decoded pseudo-gradients (FP32) the robust mean stacks:
  ``buffer_size`` × the shared layers. A fleet of N needs a buffer of about N / 4 for its
  results to come back a few versions stale (``benchmarks/fleet_soak.py`` sizes it so);
* **blob store**: full checkpoints in FP32 (the join format; the newest, the one before it
  until garbage collection, and stage 4's pinned teacher; stage 4's checkpoints hold the
  experts as trits only in the schedule's last phase, all ternary, so the stage's peak is
  still FP32, which is what is counted), the version deltas since the last checkpoint,
  and the uploads of one checkpoint period;
* **database**: one result row and its events per result (``db_bytes_per_result``,
  measured by the soak).

Bandwidth: every result is an upload (``TrafficEstimate.per_sync_up``) and the sync before
it a download (``per_sync_down``); every participant joins once per stage. The figures say
where one host stops being enough; ``docs/architecture.md`` §6.1 says how it splits.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.plan.hardware import PlanError, require_positive
from coordinator.plan.params import FP32, ParamCounts
from coordinator.plan.traffic import CodecBits, TrafficEstimate


@dataclass(frozen=True)
class HostSettings:
    """What the coordinator estimate assumes besides the model and the traffic.

    Attributes:
        fleets: participant counts to estimate for.
        max_staleness: versions of column history kept (``FederationSettings``).
        checkpoint_every: versions between full checkpoints (``FederationSettings``).
        buffer_fraction: shared-layer buffer size as a fraction of the fleet.
        db_bytes_per_result: database growth per result (rows + indexes + events).
    """

    fleets: tuple[int, ...] = (1_000, 100_000)
    max_staleness: int = 8
    checkpoint_every: int = 10
    buffer_fraction: float = 0.25
    db_bytes_per_result: float = 2_000.0

    def validate(self) -> None:
        """Raise :class:`PlanError` naming the first invalid value."""
        if not self.fleets:
            raise PlanError("fleets is empty: give at least one participant count")
        for n in self.fleets:
            require_positive("fleet size", n)
        for name in ("checkpoint_every", "buffer_fraction", "db_bytes_per_result"):
            require_positive(name, getattr(self, name))
        if self.max_staleness < 0:
            raise PlanError(f"max_staleness = {self.max_staleness}: allowed >= 0")


@dataclass(frozen=True)
class HostEstimate:
    """One federated stage's coordinator at one fleet size (bytes, bytes/s, per second).

    Attributes:
        participants: fleet size.
        results_per_s: results arriving per second (one per participant per sync period).
        buffer_size: results per outer step of the shared layers.
        ram_columns: FP32 column masters + their published history.
        ram_shared: shared master, published copy, momentum and the pseudo-gradient buffer.
        disk_checkpoints: full checkpoints kept.
        disk_versions: version deltas since the last checkpoint.
        disk_uploads: uploads of one checkpoint period.
        db_bytes_per_day: database growth per day.
        ingress_bps: uploads, bytes per second.
        egress_bps: version deltas, bytes per second (in steady state).
        join_bytes: what the fleet downloads to join (once per participant and stage; at
            the stage's start that is a burst, best served by a CDN).
        stage_days: the stage's wall-clock at this fleet size (when it is shorter than
            one sync period, the stage's token budget is too small for this fleet).
    """

    participants: int
    results_per_s: float
    buffer_size: int
    ram_columns: float
    ram_shared: float
    disk_checkpoints: float
    disk_versions: float
    disk_uploads: float
    db_bytes_per_day: float
    ingress_bps: float
    egress_bps: float
    join_bytes: float
    stage_days: float

    @property
    def ram(self) -> float:
        """All of the coordinator's RAM."""
        return self.ram_columns + self.ram_shared

    @property
    def disk(self) -> float:
        """Blob store (database growth is per day, apart)."""
        return self.disk_checkpoints + self.disk_versions + self.disk_uploads


def estimate_host(
    counts: ParamCounts,
    traffic: TrafficEstimate,
    codec: CodecBits,
    *,
    stage: int,
    participants: int,
    stage_gpu_hours: float,
    settings: HostSettings,
) -> HostEstimate:
    """The coordinator of stage ``stage`` (3 or 4) with ``participants`` volunteers, each
    with ``traffic``'s per-sync figures and one GPU (``stage_gpu_hours`` in all)."""
    period_s = traffic.compute_s_per_sync + traffic.comm_s_per_sync
    results_per_s = participants / period_s
    buffer = max(2, round(settings.buffer_fraction * participants))
    experts, shared = counts.experts_total, counts.shared
    # A version is made of ``buffer`` results: the shared part and the deltas of the
    # columns they changed; a checkpoint is the whole model in FP32.
    checkpoint = FP32 * (experts + shared)
    changed = min(counts.n_experts, buffer * traffic.columns)
    per_version = (shared * codec.shared_bits + changed * counts.column * codec.delta_bits) / 8
    period_results = buffer * settings.checkpoint_every
    stage_s = stage_gpu_hours * 3600 / participants
    teacher = 1 if stage == 4 else 0
    return HostEstimate(
        participants=participants,
        results_per_s=results_per_s,
        buffer_size=buffer,
        ram_columns=FP32 * experts * (2 + settings.max_staleness),
        ram_shared=FP32 * shared * (3 + buffer),
        disk_checkpoints=checkpoint * (2 + teacher),
        disk_versions=per_version * settings.checkpoint_every,
        disk_uploads=period_results * traffic.per_sync_up,
        db_bytes_per_day=results_per_s * 86_400 * settings.db_bytes_per_result,
        ingress_bps=results_per_s * traffic.per_sync_up,
        egress_bps=results_per_s * traffic.per_sync_down,
        join_bytes=participants * traffic.initial_download,
        stage_days=stage_s / 86_400,
    )
