"""The scoring settings' check and its error (:mod:`coordinator.routing.rescoring` uses both).

Apart from the re-scoring itself because
:class:`~coordinator.federation_settings.FederationSettings` checks these at construction, and
the CLI builds settings before anything imports torch.
"""

from __future__ import annotations


class RescoringError(ValueError):
    """Re-scoring settings or stored routing that cannot be used (says what and the fix)."""


def check_rescoring(
    score_every: int, rescore_every_versions: int, margin: float, slack: float
) -> None:
    """Raise :class:`RescoringError` unless the scoring settings make sense."""
    if score_every < 0 or rescore_every_versions < 0:
        raise RescoringError(
            "score_every and rescore_every_versions must be >= 0 (0 = off); got "
            f"{score_every} and {rescore_every_versions}"
        )
    if not 0.0 <= margin < 1.0:
        raise RescoringError(f"rescore_margin must be in [0, 1) (e.g. 0.02), got {margin}")
    if not slack >= 1.0:
        raise RescoringError(f"rescore_slack must be >= 1 (e.g. 1.1), got {slack}")
