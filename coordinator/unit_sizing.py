"""Unit sizing: how many inner steps a new unit gets, from the participant's measured speed.

Apart from :mod:`coordinator.leasing` (which uses it) because
:class:`~coordinator.federation_settings.FederationSettings` checks it at construction, and
the CLI builds settings before anything imports torch: a bad setting is refused in a second.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from coordinator import reply_fields

log = logging.getLogger(__name__)


class UnitSizingError(ValueError):
    """Unit-sizing settings that cannot work together (the message says which, and the fix)."""


@dataclass(frozen=True)
class UnitSizing:
    """How many inner steps a new unit gets, from the participant's measured speed.

    With ``unit_seconds`` set, a participant that reported ``tokens_per_s`` gets
    ``clamp(round(unit_seconds * tokens_per_s / tokens_per_step), min_steps, max_steps)``
    steps, so that a unit trains for about ``unit_seconds`` on a fast or a slow machine
    (long enough that Flower's ~3 s poll does not leave it idle). Without a report yet, or
    without ``unit_seconds``, a unit has ``steps_per_unit`` steps.

    The lease bounds it too, with or without ``unit_seconds`` (a slow machine gets fewer
    steps rather than units it cannot finish before their leases expire): a participant
    works through its ``max_in_flight`` units one after the other, so the last leased
    finishes ``max_in_flight`` unit times after its lease started; that must stay under
    ``lease_fraction * lease_seconds`` (the rest is headroom for syncing, uploading and a
    slower-than-reported machine).

    Attributes:
        steps_per_unit: steps of a unit when the speed is unknown or sizing is off.
        unit_seconds: target training time of one unit, seconds; ``None`` = fixed size.
        min_steps: fewest steps of a sized unit (unless the lease allows fewer).
        max_steps: most steps of a sized unit; ``None`` = ``8 * steps_per_unit``.
        lease_seconds: lease duration of every unit.
        max_in_flight: units each participant has leased at once.
        lease_fraction: share of the lease the in-flight units may take to train.
    """

    # No defaults: :meth:`coordinator.federation_settings.FederationSettings.sizing` is the
    # one place these are set from (one set of federation defaults).
    steps_per_unit: int
    unit_seconds: float | None
    min_steps: int
    max_steps: int | None
    lease_seconds: float
    max_in_flight: int
    lease_fraction: float

    def __post_init__(self) -> None:
        if self.max_steps is None:
            object.__setattr__(self, "max_steps", max(8 * self.steps_per_unit, self.min_steps))
        if self.steps_per_unit < 1 or self.min_steps < 1 or self.max_steps < 1:
            raise UnitSizingError(
                "steps_per_unit, min_steps_per_unit and max_steps_per_unit must be >= 1; got "
                f"{self.steps_per_unit}, {self.min_steps}, {self.max_steps}"
            )
        if self.min_steps > self.max_steps:
            raise UnitSizingError(
                f"min_steps_per_unit ({self.min_steps}) is larger than max_steps_per_unit "
                f"({self.max_steps}); lower the minimum or raise the maximum"
            )
        if self.unit_seconds is not None and not self.unit_seconds > 0:
            raise UnitSizingError(
                f"unit_seconds must be > 0 (or None for fixed-size units), got {self.unit_seconds}"
            )
        if not 0 < self.lease_fraction <= 1 or self.lease_seconds <= 0 or self.max_in_flight < 1:
            raise UnitSizingError(
                "need 0 < lease_fraction <= 1, lease_seconds > 0 and max_in_flight >= 1; got "
                f"{self.lease_fraction}, {self.lease_seconds}, {self.max_in_flight}"
            )
        budget = self.lease_fraction * self.lease_seconds
        if self.unit_seconds is not None and self.unit_seconds * self.max_in_flight > budget:
            raise UnitSizingError(
                f"{self.max_in_flight} units in flight of unit_seconds={self.unit_seconds} do "
                f"not fit in {self.lease_fraction:.0%} of lease_seconds={self.lease_seconds}; "
                "lower unit_seconds or raise lease_seconds"
            )

    def steps_for(self, tokens_per_s: float | None, tokens_per_step: int) -> int:
        """Steps of a new unit for a participant training ``tokens_per_s`` tokens/s.

        Args:
            tokens_per_s: the participant's last reported training speed (``None`` or 0:
                not reported yet; NaN, infinite or negative, e.g. stored before replies
                were checked: treated as not reported).
            tokens_per_step: tokens of one inner step (``batch_size * seq_len``).
        """
        tokens_per_s = reply_fields.speed(tokens_per_s)
        if tokens_per_s is None:
            return self.steps_per_unit
        step_s = tokens_per_step / tokens_per_s
        if self.unit_seconds is None:  # fixed H, but never more than a slow node can do
            steps = self.steps_per_unit
        else:
            steps = min(max(round(self.unit_seconds / step_s), self.min_steps), self.max_steps)
        # The in-flight units must all train within a fraction of one lease.
        fits = max(
            1, math.floor(self.lease_fraction * self.lease_seconds / (self.max_in_flight * step_s))
        )
        if steps > fits:
            log.info(
                "unit clamped to %d steps (wanted %d): at %.0f tokens/s, %d units in flight "
                "must train within %.0f%% of the %.0f s lease",
                fits, steps, tokens_per_s, self.max_in_flight, 100 * self.lease_fraction,
                self.lease_seconds,
            )  # fmt: skip
            steps = fits
        return steps
