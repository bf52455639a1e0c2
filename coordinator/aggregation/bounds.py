"""Per-tensor bounds on the size of a participant's update (intake's ``NORM_OUT_OF_BOUNDS``).

A global bound on a whole update's norm means nothing across presets and tensors (a
``tiny`` column's weights have norm ~7.5; a bound of 1e4 let ×1000 attacks through). Each
decoded tensor ``u`` of an update (a column delta or a shared pseudo-gradient) is measured
against the tensor ``W`` it applies to, as the ratio ``r = ‖u‖ / ‖W‖``, and refused when

1. ``r > max_ratio`` (the tensor's own scale: an honest unit moves a tensor by a few %), or
2. ``r > tolerance × median`` of the ratios of the last ``window`` *accepted* updates of
   the same tensor (the robust statistics of recent honest updates; used once
   :data:`MIN_HISTORY` are known, and not for a tensor whose median update is 0, e.g. one
   the participants' trainer never changes). The same weight of every column shares one history
   (``experts.<n>.`` is one key), so a column's only owner cannot set its own bar.

Only accepted results enter the history, and the median ignores a minority of outliers,
so an attacker at 20 % of the results cannot raise the bar. The history is in memory: a
restarted coordinator starts with rule 1 alone until ``min_history`` results are in.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict, deque

import torch

State = dict[str, torch.Tensor]
_EXPERT = re.compile(r"\.experts\.\d+\.")
#: Floor of ``‖W‖`` (per element): a tensor near zero is measured against entries of 1e-3.
_NORM_FLOOR = 1e-3
#: Accepted updates of a tensor needed before rule 2 applies (the median of fewer is noise).
MIN_HISTORY = 8


class OutOfBounds(ValueError):
    """An update tensor is too large; the message names it and the bound it broke."""


def history_key(kind: str, name: str) -> str:
    """The statistics key of tensor ``name`` of a ``kind`` ('column'/'shared') update."""
    return f"{kind}:{_EXPERT.sub('.experts.*.', name)}"


class UpdateBounds:
    """Checks update tensors against their own weights and against recent accepted updates.

    Args:
        max_ratio: bound on ``‖u‖ / ‖W‖`` per tensor (``inf``: off).
        tolerance: bound on ``r / median(recent r)`` per tensor (``inf``: off).
        window: accepted updates remembered per tensor.
        min_history: rule 2 applies once this many are remembered.
        max_norm: bound on the whole update's norm (absolute; ``inf``: off).
    """

    def __init__(
        self,
        *,
        max_ratio: float,
        tolerance: float,
        window: int,
        min_history: int,
        max_norm: float = math.inf,
    ) -> None:
        self.max_ratio, self.tolerance = max_ratio, tolerance
        self.window, self.min_history, self.max_norm = window, min_history, max_norm
        self._history: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))

    @classmethod
    def from_settings(cls, settings) -> UpdateBounds:
        """The bounds of a :class:`~coordinator.federation_settings.FederationSettings`."""
        return cls(
            max_ratio=settings.max_update_ratio,
            tolerance=settings.update_norm_tolerance,
            window=settings.update_norm_window,
            min_history=min(MIN_HISTORY, settings.update_norm_window),
            max_norm=settings.max_update_norm,
        )

    def check(self, kind: str, update: State, reference: State) -> list[tuple[str, float]]:
        """``[(key, ‖u‖ / ‖W‖)]`` for every tensor of ``update`` (to :meth:`record` once
        accepted).

        Raises:
            OutOfBounds: a tensor breaks rule 1 or 2, or the whole norm ``max_norm``.
        """
        ratios: list[tuple[str, float]] = []
        total_sq = 0.0
        for name, u in update.items():
            norm = float(u.double().norm())
            total_sq += norm * norm
            ref = reference[name]
            floor = _NORM_FLOOR * math.sqrt(ref.numel())
            ratio = norm / max(float(ref.double().norm()), floor)
            key = history_key(kind, name)
            self._check_one(kind, name, ratio, key)
            ratios.append((key, ratio))
        if math.sqrt(total_sq) > self.max_norm:
            raise OutOfBounds(
                f"{kind} update norm {math.sqrt(total_sq):.3g} exceeds the bound "
                f"{self.max_norm:.3g} (max_update_norm)"
            )
        return ratios

    def _check_one(self, kind: str, name: str, ratio: float, key: str) -> None:
        if ratio > self.max_ratio:
            raise OutOfBounds(
                f"{kind} tensor {name}: update is {ratio:.3g} × the tensor's norm; the bound "
                f"is {self.max_ratio:.3g} (max_update_ratio)"
            )
        median = self._median(key)
        if median and ratio > self.tolerance * median:  # 0: a tensor honest units never move
            raise OutOfBounds(
                f"{kind} tensor {name}: update ratio {ratio:.3g} is {ratio / median:.3g} × the "
                f"median of the last {len(self._history[key])} accepted ({median:.3g}); the "
                f"bound is {self.tolerance:.3g} × (update_norm_tolerance)"
            )

    def _median(self, key: str) -> float | None:
        recent = self._history.get(key)
        if recent is None or len(recent) < self.min_history:
            return None
        return statistics.median(recent)

    def bar(self, kind: str, name: str) -> float:
        """The largest ratio ``‖u‖ / ‖W‖`` tensor ``name`` may have now (``inf``: none)."""
        median = self._median(history_key(kind, name))
        return min(self.max_ratio, self.tolerance * median) if median else self.max_ratio

    def record(self, ratios: list[tuple[str, float]]) -> None:
        """Remember the ratios of an accepted update (from :meth:`check`)."""
        for key, ratio in ratios:
            self._history[key].append(ratio)

    def history(self) -> dict[str, list[float]]:
        """The remembered ratios per statistics key, oldest first (calibration)."""
        return {key: list(values) for key, values in self._history.items()}
