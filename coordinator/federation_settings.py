"""Every knob of a federated stage, with its one default and its allowed range.

:class:`FederationSettings` is the only place these values have defaults: the coordinator
state, the aggregators, the leasing policy and the loop receive them from it, and both
``perspective coordinator serve`` and ``perspective demo`` build it with
:func:`load_federation_settings` from an optional YAML file (``--federation-config``,
keys = field names) and their flags, flags last. The table of knobs is in
``docs/federated-training.md`` §4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from coordinator.unit_sizing import UnitSizing

CODECS = ("ternary", "sparse")
#: All-ternary experts (stage 4 at fraction 1) may also travel as their ternary values.
TERNARY_COLUMN_CODECS = (*CODECS, "trits")
#: :data:`coordinator.aggregation.robust.AGGREGATORS` (not imported: torch at CLI start-up)
AGGREGATORS = ("centered_clip", "trimmed_mean", "median", "mean")


class FederationSettingsError(ValueError):
    """A federation setting is unknown or out of range; the message names it and the range."""


@dataclass(frozen=True)
class FederationSettings:
    """Knobs of one federated stage (``docs/federated-training.md`` §4 says why each default).

    Units: ``unit_seconds`` (``None``: every unit has ``steps_per_unit`` steps) is the
    target training time of a unit, sized from each participant's tokens/s within
    ``min/max_steps_per_unit`` (max ``None``: 8 × ``steps_per_unit``) and the lease; see
    :class:`~coordinator.leasing.UnitSizing`, whose ``UnitSizingError`` bad values raise.
    The lr and ternary schedules are counted in inner optimiser steps, indexed by the steps
    leased before a unit; they last the token budget's steps, or with only a time budget
    the steps answered plus what the rate since the first answer adds in the time left,
    or otherwise last
    ``units_hint`` × ``steps_per_unit`` steps (``StageBudget.schedule_steps``).
    ``shared_sync_every`` > 0 and below a unit's steps H (in-unit shared syncs): the unit is
    leased as parts of that many steps, each sending its shared pseudo-gradient and syncing
    the shared layers, and only every round(H / ``shared_sync_every``)-th part of a node
    (and every part in the stage's last tenth) sends its columns, which train on locally
    across the parts (0: off).

    Aggregation: every ``buffer_size`` accepted results the shared layers take one outer
    step (``outer_lr``, Nesterov ``outer_momentum``) on the ``aggregator``'s robust mean of
    the staleness-weighted pseudo-gradients (w = 1 / √(1 + s − ``staleness_grace``) for a
    result s versions stale, 1 within the grace; a column master moves w of the way to its
    result) (``centered_clip`` with radius ``clip_factor``
    × the median update norm; ``trimmed_mean`` trims ``trim`` results at each end per
    coordinate; ``median``; ``mean``); results based more than
    ``max_staleness`` versions back are refused; every ``checkpoint_every`` versions a
    full checkpoint is published (and the blob store is garbage-collected);
    ``diversity_lr`` > 0 applies the diversity term on the expert masters before each
    publication. The shared layers travel with ``shared_codec`` (``ternary``: a value is
    sent where it exceeds ``shared_threshold`` × the tensor's mean magnitude) and expert
    columns with ``column_codec``, both ways, until the experts are all ternary (stage-4 units at
    ternary fraction 1): from then on columns travel with ``ternary_column_codec``
    (``trits``: their ternary values, version to version as trit flips; the FP latent
    stays with its owner). With ``eager_updates`` > 0 a participant starts each unit from
    the synced shared layers minus ``eager_updates`` × its share of an outer step
    (``outer_lr`` / ``buffer_size``) of each shared pseudo-gradient it sent that the
    versions it synced do not apply yet: 1 adds its own share of the step on its way,
    ``buffer_size`` lets its update stand in for the whole step (as Kale et al. 2025; it
    cost loss here: docs/federated-training.md §5.1).

    Defences (:mod:`coordinator.aggregation.bounds`, :mod:`coordinator.column_validation`,
    :mod:`coordinator.reputation`): each update tensor must be within ``max_update_ratio``
    × the tensor's norm and ``update_norm_tolerance`` × the median ratio of the last
    ``update_norm_window`` accepted updates of it (``max_update_norm``: an absolute bound
    on a whole update, off by default); a column result must not raise the loss of
    ``column_check_sequences`` held-out windows of ``column_check_window`` tokens (at most
    ``train.seq_len``) of its column by more than ``column_loss_tolerance`` (relative; 0
    sequences: off); a participant with
    ``quarantine_after`` such failures among its last ``reputation_window`` results gets no
    units for ``quarantine_seconds`` after the last one (0: off).

    Scoring (:mod:`coordinator.routing.rescoring`, off by default): every ``score_every``-th unit
    leased also reports its documents' losses under each of its columns; every
    ``rescore_every_versions`` versions a document moves to a column whose loss is lower
    by ``rescore_margin`` (relative), within ``rescore_slack`` of the balanced size.
    Bad values raise ``RescoringError``.
    """

    stage: int = 3
    # units and leases
    steps_per_unit: int = 10
    unit_seconds: float | None = None
    min_steps_per_unit: int = 5
    max_steps_per_unit: int | None = None
    lease_seconds: float = 300.0
    lease_fraction: float = 0.5
    max_in_flight: int = 3
    max_attempts: int = 3
    docs_per_unit: int = 32
    shared_sync_every: int = 0
    units_hint: int = 200
    # compression
    column_codec: str = "sparse"
    ternary_column_codec: str = "trits"
    shared_codec: str = "ternary"
    shared_threshold: float = 1.0
    eager_updates: float = 1.0
    # aggregation and publishing
    buffer_size: int = 2
    max_staleness: int = 8
    staleness_grace: int = 1
    outer_lr: float = 1.5
    outer_momentum: float = 0.0
    trim: int = 0
    aggregator: str = "centered_clip"
    clip_factor: float = 1.0
    diversity_lr: float = 0.0
    checkpoint_every: int = 10
    # defences against hostile results (docs/federated-training.md §3.3)
    max_update_ratio: float = 2.0
    update_norm_tolerance: float = 4.0
    update_norm_window: int = 64
    max_update_norm: float = math.inf
    column_check_sequences: int = 8
    column_check_window: int = 64
    column_loss_tolerance: float = 0.1
    quarantine_after: int = 3
    reputation_window: int = 10
    quarantine_seconds: float = 3600.0
    # evaluation
    eval_every: int = 5
    eval_batches: int = 16
    # scoring and re-routing
    score_every: int = 0
    rescore_every_versions: int = 0
    rescore_margin: float = 0.02
    rescore_slack: float = 1.1
    # where the loop checkpoints the coordinator state (None: <work dir>/state.safetensors)
    state_path: Path | None = field(default=None)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = _coerce(f.name, f.type, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            rule = RANGES.get(f.name)
            if rule is not None and value is not None and not rule[0](value):
                raise FederationSettingsError(f"{f.name} = {value!r} is invalid: allowed {rule[1]}")
        if self.quarantine_after > self.reputation_window:
            raise FederationSettingsError(
                f"quarantine_after = {self.quarantine_after} is invalid: allowed 0 (off) to "
                f"reputation_window = {self.reputation_window}"
            )
        if 2 * self.trim >= self.buffer_size:  # robust.trimmed_mean would silently not trim
            raise FederationSettingsError(
                f"trim = {self.trim} is invalid: allowed 0 <= trim < buffer_size / 2 "
                f"(buffer_size = {self.buffer_size})"
            )
        from coordinator.routing.scoring_settings import check_rescoring

        self.sizing()  # fail at construction, not at the first lease
        check_rescoring(
            self.score_every, self.rescore_every_versions, self.rescore_margin, self.rescore_slack
        )

    def sizing(self) -> UnitSizing:
        """The unit-sizing policy these settings describe."""
        from coordinator.unit_sizing import UnitSizing

        return UnitSizing(
            steps_per_unit=self.steps_per_unit,
            unit_seconds=self.unit_seconds,
            min_steps=self.min_steps_per_unit,
            max_steps=self.max_steps_per_unit,
            lease_seconds=self.lease_seconds,
            max_in_flight=self.max_in_flight,
            lease_fraction=self.lease_fraction,
        )


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"a value >= {low}"


# Ranges checked here; unit sizing (steps, unit_seconds, lease) and scoring have their own
# errors (UnitSizingError, RescoringError), raised by ``sizing()`` / ``check_rescoring``.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stage": ((lambda v: v in (3, 4)), "3 or 4"),
    "max_attempts": _at_least(1),
    "docs_per_unit": _at_least(1),
    "shared_sync_every": _at_least(0),
    "units_hint": _at_least(1),
    "column_codec": ((lambda v: v in CODECS), " or ".join(CODECS)),
    "ternary_column_codec": (
        (lambda v: v in TERNARY_COLUMN_CODECS),
        " or ".join(TERNARY_COLUMN_CODECS),
    ),
    "shared_codec": ((lambda v: v in CODECS), " or ".join(CODECS)),
    "shared_threshold": ((lambda v: 0 < v < 2), "0 < value < 2"),
    "eager_updates": ((lambda v: 0 <= v <= 4), "0 <= value <= 4 (0: off)"),
    "buffer_size": _at_least(1),
    "max_staleness": _at_least(0),
    "staleness_grace": _at_least(0),
    "outer_lr": ((lambda v: 0 <= v < math.inf), "a finite value >= 0"),
    "outer_momentum": ((lambda v: 0 <= v < 1), "0 <= value < 1"),
    "trim": _at_least(0),
    "aggregator": ((lambda v: v in AGGREGATORS), " or ".join(AGGREGATORS)),
    "clip_factor": ((lambda v: 0 < v < math.inf), "a finite value > 0"),
    "diversity_lr": ((lambda v: 0 <= v < math.inf), "a finite value >= 0 (0: off)"),
    "checkpoint_every": _at_least(1),
    "max_update_norm": ((lambda v: v > 0), "a value > 0 (inf: no limit)"),
    "max_update_ratio": ((lambda v: v > 0), "a value > 0 (inf: no limit)"),
    "update_norm_tolerance": ((lambda v: v >= 1), "a value >= 1 (inf: off)"),
    "update_norm_window": _at_least(1),
    "column_check_sequences": _at_least(0),
    "column_check_window": _at_least(2),
    "column_loss_tolerance": ((lambda v: v >= 0), "a value >= 0 (inf: never refuse)"),
    "quarantine_after": _at_least(0),
    "reputation_window": _at_least(1),
    "quarantine_seconds": ((lambda v: v >= 0), "a value >= 0"),
    "eval_every": _at_least(1),
    "eval_batches": _at_least(1),
}

_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "Path": (str, Path),
}


def _quoted_number(value: Any) -> str:
    """A hint for a number YAML read as a string (``inf``, ``'0.5'``), else ''."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (YAML reads this as a string: write numbers unquoted, and infinity as .inf)"


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """Check ``value`` against the field's annotation (``int``, ``float | None``, ...)."""
    kind, _, optional = annotation.partition(" | ")
    if value is None and optional == "None":
        return None
    accepted = _KINDS[kind]
    if isinstance(value, bool) or not isinstance(value, accepted):
        what = {"int": "an integer", "float": "a number", "str": "a string", "Path": "a path"}
        none = " or null" if optional else ""
        raise FederationSettingsError(
            f"{name} = {value!r} is invalid: allowed {what[kind]}{none}{_quoted_number(value)}"
        )
    if kind == "float":
        return float(value)
    return Path(value) if kind == "Path" else value


def load_federation_settings(
    path: Path | None,
    overrides: Mapping[str, Any] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
) -> FederationSettings:
    """Build the settings of ``serve`` and ``demo``: defaults, then the file, then flags.

    Args:
        path: YAML file mapping field names to values (``None``: no file).
        overrides: values given as flags; ``None`` values mean "not given".
        defaults: the caller's own defaults for some fields (the demo: ``buffer_size`` =
            its number of participants), below the file and the flags.

    Raises:
        FederationSettingsError: unreadable file, unknown key (the message lists the
            allowed ones) or a value out of range; ``UnitSizingError`` and
            ``RescoringError`` (both ``ValueError``) for unit sizing and scoring.
    """
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        values.update(_read_file(Path(path)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    _check_keys(values, f"in {path}" if path is not None else "")
    return FederationSettings(**values)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FederationSettingsError(f"cannot read federation config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise FederationSettingsError(f"federation config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FederationSettingsError(
            f"federation config {path} must be a mapping of setting names to values"
        )
    _check_keys(data, f"in {path}")
    return data


def _check_keys(values: Mapping[str, Any], where: str) -> None:
    allowed = [f.name for f in fields(FederationSettings)]
    unknown = sorted(str(k) for k in values if k not in allowed)
    if unknown:
        raise FederationSettingsError(
            f"unknown federation setting(s) {', '.join(unknown)} {where}".rstrip()
            + f"; allowed: {', '.join(allowed)}"
        )


@dataclass(frozen=True)
class LoopStats:
    """A snapshot of a stage's totals (:meth:`coordinator.federation.FederationLoop.totals`):
    counts from the result log, control bytes and loss history from the loop."""

    tokens: int = 0
    accepted: int = 0
    rejected: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    train_s: float = 0.0
    unit_s: float = 0.0
