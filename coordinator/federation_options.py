"""The federation flags shared by ``perspective coordinator serve`` and ``perspective demo``.

Both commands declare these options (same names, same help) and build their
:class:`~coordinator.federation_settings.FederationSettings` with :func:`settings_from_cli`:
the settings' defaults, then the command's own defaults (the demo: ``buffer_size`` = its
participants), then ``--federation-config FILE.yaml`` (keys = field names), then the flags
given. A flag left out is ``None`` and does not override the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from coordinator.federation_settings import FederationSettings, load_federation_settings

_DEFAULTS = {f.name: f.default for f in fields(FederationSettings)}


def _option(flag: str, what: str, shown: str | None = None) -> Any:
    default = _DEFAULTS[flag.lstrip("-").replace("-", "_")]
    shown = shown or ("off" if default is None else str(default))
    return typer.Option(flag, help=f"{what} [default: {shown}]", show_default=False)


FederationConfig = Annotated[
    Path | None,
    typer.Option(
        "--federation-config",
        exists=True,
        dir_okay=False,
        help="YAML file of federation settings (keys = FederationSettings fields; flags win).",
    ),
]
Data = Annotated[
    str,
    typer.Option(
        "--data",
        help="Training corpus: 'stdlib' (the demo corpus), a directory of .txt/.jsonl files, "
        "a .jsonl/.txt file or hf:NAME[:split] (a local Hugging Face dataset; needs the "
        "'datasets' library). Prepared once under the work dir.",
    ),
]
BufferSize = Annotated[int | None, _option("--buffer-size", "Results per outer step / version.")]
StepsPerUnit = Annotated[int | None, _option("--steps-per-unit", "Inner steps per unit (H).")]
SharedSyncEvery = Annotated[
    int | None,
    _option(
        "--shared-sync-every",
        "In-unit shared syncs: lease units as parts of this many steps, each syncing the "
        "shared layers; columns go up once per unit (0: off).",
    ),
]
UnitSeconds = Annotated[
    float | None,
    _option("--unit-seconds", "Size units to this many seconds from each node's tokens/s."),
]
MaxStepsPerUnit = Annotated[
    int | None,
    _option("--max-steps-per-unit", "Cap on sized units' steps.", "8 x --steps-per-unit"),
]
MaxInFlight = Annotated[int | None, _option("--max-in-flight", "Units leased per participant.")]
LeaseSeconds = Annotated[float | None, _option("--lease-seconds", "Lease deadline, seconds.")]
ScoreEvery = Annotated[
    int | None,
    _option("--score-every", "Every Nth unit also scores its documents per column (0: off)."),
]
RescoreEveryVersions = Annotated[
    int | None,
    _option(
        "--rescore-every-versions",
        "Re-route documents by losses every N versions (0: off).",
    ),
]
ColumnCodec = Annotated[
    str | None, _option("--column-codec", "Column upload codec: ternary | sparse.")
]
TernaryColumnCodec = Annotated[
    str | None,
    _option(
        "--ternary-column-codec",
        "Column codec once the experts are all ternary (stage 4 at fraction 1): "
        "trits (their ternary values, as trit flips) | ternary | sparse.",
    ),
]
SharedCodec = Annotated[
    str | None,
    _option("--shared-codec", "Shared pseudo-gradient and version codec: ternary | sparse."),
]
OuterLr = Annotated[float | None, _option("--outer-lr", "Outer (server) learning rate.")]
OuterMomentum = Annotated[
    float | None, _option("--outer-momentum", "Outer Nesterov momentum, in [0, 1).")
]
MaxStaleness = Annotated[
    int | None, _option("--max-staleness", "Refuse results based this many versions back.")
]
CheckpointEvery = Annotated[
    int | None, _option("--checkpoint-every", "Full checkpoint (and blob GC) every N versions.")
]
Trim = Annotated[
    int | None, _option("--trim", "Results trimmed at each end of the shared-layer mean.")
]
Aggregator = Annotated[
    str | None,
    _option(
        "--aggregator",
        "Robust mean of the shared layers' buffer: centered_clip | trimmed_mean | median | mean.",
    ),
]
ClipFactor = Annotated[
    float | None,
    _option("--clip-factor", "centered_clip radius, x the median update norm of the buffer."),
]
MaxUpdateRatio = Annotated[
    float | None,
    _option("--max-update-ratio", "Refuse an update tensor over this x the tensor's own norm."),
]
UpdateNormTolerance = Annotated[
    float | None,
    _option(
        "--update-norm-tolerance",
        "Refuse an update tensor over this x the median of recent ones, per step size.",
    ),
]
ColumnLossTolerance = Annotated[
    float | None,
    _option(
        "--column-loss-tolerance",
        "Refuse a column result raising its held-out loss by more than this (relative).",
    ),
]
QuarantineAfter = Annotated[
    int | None,
    _option(
        "--quarantine-after",
        "Quarantine a node with this many refused-as-hostile results in its recent ones (0: off).",
    ),
]
DiversityLr = Annotated[
    float | None,
    _option("--diversity-lr", "Diversity-term step on the expert masters (0: off)."),
]

FIELDS = frozenset(_DEFAULTS)


def settings_from_cli(
    config: Path | None,
    flags: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
) -> FederationSettings:
    """Settings from the file and the flags of a command (its parameters, e.g. ``locals()``).

    Only parameters named like a settings field count; ``None`` means "not given".

    Raises:
        typer.BadParameter: an unknown key or bad value; the message names it and the range.
    """
    given = {k: v for k, v in flags.items() if k in FIELDS}
    try:
        return load_federation_settings(config, given, defaults=defaults)
    except ValueError as exc:  # FederationSettingsError, UnitSizingError, RescoringError
        raise typer.BadParameter(str(exc)) from exc
