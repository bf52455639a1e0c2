"""Settings and running totals of a federated stage (used by the loop, serve and the demo)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coordinator.leasing import UnitSizing
from coordinator.routing.rescoring import check_rescoring


@dataclass
class FederationSettings:
    """Knobs of one federated stage (defaults from ``docs/federated-training.md``).

    ``unit_seconds`` (``None``: every unit has ``steps_per_unit`` steps) is the target
    training time of a unit, sized from each participant's tokens/s within
    ``min/max_steps_per_unit`` (max ``None``: 8 × ``steps_per_unit``) and the lease; see
    :class:`~coordinator.leasing.UnitSizing`, whose ``UnitSizingError`` bad values raise.

    Scoring (:mod:`coordinator.routing.rescoring`, off by default): every ``score_every``-th unit
    leased also reports its documents' losses under each of its columns; every
    ``rescore_every_versions`` versions a document moves to a column whose loss is lower
    by ``rescore_margin`` (relative), within ``rescore_slack`` of the balanced size.
    Bad values raise ``RescoringError``.
    """

    stage: int = 3
    steps_per_unit: int = 20
    unit_seconds: float | None = None
    min_steps_per_unit: int = 5
    max_steps_per_unit: int | None = None
    lease_seconds: float = 300.0
    max_in_flight: int = 2
    docs_per_unit: int = 32
    column_codec: str = "ternary"
    shared_codec: str = "ternary"
    eval_every: int = 5
    eval_batches: int = 4
    max_update_norm: float = 1e4
    state_path: Path | None = None
    score_every: int = 0
    rescore_every_versions: int = 0
    rescore_margin: float = 0.02
    rescore_slack: float = 1.1

    def __post_init__(self) -> None:
        self.sizing()  # fail at construction, not at the first lease
        check_rescoring(
            self.score_every, self.rescore_every_versions, self.rescore_margin, self.rescore_slack
        )

    def sizing(self) -> UnitSizing:
        """The unit-sizing policy these settings describe."""
        return UnitSizing(
            steps_per_unit=self.steps_per_unit,
            unit_seconds=self.unit_seconds,
            min_steps=self.min_steps_per_unit,
            max_steps=self.max_steps_per_unit,
            lease_seconds=self.lease_seconds,
            max_in_flight=self.max_in_flight,
        )


@dataclass
class LoopStats:
    """Running totals shown by the demo and the dashboard."""

    tokens: int = 0
    accepted: int = 0
    rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    train_s: float = 0.0
    unit_s: float = 0.0
