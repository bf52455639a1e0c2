"""Per-tensor bounds on the size of a participant's update (intake's ``NORM_OUT_OF_BOUNDS``).

A global bound on a whole update's norm means nothing across presets and tensors (a
``tiny`` column's weights have norm ~7.5; a bound of 1e4 let ×1000 attacks through). Each
decoded tensor ``u`` of an update (a column delta or a shared pseudo-gradient) is measured
against the tensor ``W`` it applies to, as the ratio ``r = ‖u‖ / ‖W‖``, and refused when

1. ``r > max_ratio`` (the tensor's own scale: an honest unit moves a tensor by a few %), or
2. ``r / s > tolerance × median`` of the same quantity over the last ``window``
   updates of the same tensor (see below), where ``s`` is the unit's step size
   (:meth:`UpdateBounds.step_size`: the highest lr so far × √steps, the steps the update
   carries: ``coordinator.intake.unit_step_sizes``). Honest updates grow
   with the lr, so the warm-up's first updates do not set a bar ten times too low for the
   peak lr (on ``small`` they once refused every honest result after them and quarantined
   the whole network); after the peak the bar stays put, because updates carrying error
   feedback shrink more slowly than the lr. Adam's updates grow between √steps and steps:
   √steps keeps units of different lengths within √(length ratio) of each other
   (the robust statistics of recent honest updates; used once
   :data:`MIN_HISTORY` are known, and not for a tensor whose median update is 0, e.g. one
   the participants' trainer never changes). The same weight of every column shares one history
   (``experts.<n>.`` is one key), so a column's only owner cannot set its own bar; trit
   flips, columns started from the published weights and columns carried on by their owner
   are three kinds of update with a history each (``coordinator.intake.column_bounds_kind``).

The history holds the accepted updates and those refused by rule 2 alone (within rule 1):
honest updates that outgrow a stale bar (the schedule changes what honest is, and error
feedback makes updates shrink more slowly than the lr) move the median along instead of
being refused for ever. The median ignores a minority of outliers, so an attacker at 20 %
of the results cannot raise the bar, and rule 1 bounds what it can enter. The history and
the peak lr are saved with the coordinator state at every state checkpoint
(:meth:`UpdateBounds.state_dict`), so a restart (a kill -9 included) goes on with the same
bars instead of reopening a window in which rule 1 alone holds; what was recorded after the
last state checkpoint is lost, at most ``checkpoint_every`` versions' worth.
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
    """Checks update tensors against their own weights and against recent updates (per step size).

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
        self._peak_lr = 0.0
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

    def step_size(self, lr: float | None, steps: int) -> float:
        """The step size ``s`` of a unit of ``steps`` at ``lr`` (rule 2): the highest lr
        seen so far × √steps; 1 without a usable lr (a unit not leased with one)."""
        if lr is None or not math.isfinite(lr) or lr <= 0:
            return 1.0
        self._peak_lr = max(self._peak_lr, float(lr))
        return self._peak_lr * math.sqrt(max(int(steps), 1))

    def check(
        self, kind: str, update: State, reference: State, step_size: float = 1.0
    ) -> list[tuple[str, float]]:
        """``[(key, ‖u‖ / ‖W‖ / step_size)]`` for every tensor of ``update`` (to
        :meth:`record` once accepted); ``step_size``: from :meth:`step_size` (rule 2).

        Raises:
            OutOfBounds: a tensor breaks rule 1 or 2, or the whole norm ``max_norm``.
        """
        ratios: list[tuple[str, float]] = []
        measured: list[tuple[str, str, float]] = []
        total_sq = 0.0
        for name, u in update.items():
            norm = float(u.double().norm())
            total_sq += norm * norm
            ref = reference[name]
            floor = _NORM_FLOOR * math.sqrt(ref.numel())
            ratio = norm / max(float(ref.double().norm()), floor)
            if ratio > self.max_ratio:  # rule 1
                raise OutOfBounds(
                    f"{kind} tensor {name}: update is {ratio:.3g} × the tensor's norm; the "
                    f"bound is {self.max_ratio:.3g} (max_update_ratio)"
                )
            measured.append((name, history_key(kind, name), ratio))
            ratios.append((measured[-1][1], ratio / step_size))
        if math.sqrt(total_sq) > self.max_norm:
            raise OutOfBounds(
                f"{kind} update norm {math.sqrt(total_sq):.3g} exceeds the bound "
                f"{self.max_norm:.3g} (max_update_norm)"
            )
        try:
            for name, key, ratio in measured:
                self._check_relative(kind, name, ratio, key, step_size)
        except OutOfBounds:
            self.record(ratios)  # within rule 1: it moves the median (see the module doc)
            raise
        return ratios

    def _check_relative(
        self, kind: str, name: str, ratio: float, key: str, step_size: float
    ) -> None:
        median, scaled = self._median(key), ratio / step_size
        if median and scaled > self.tolerance * median:  # 0: a tensor honest units never move
            raise OutOfBounds(
                f"{kind} tensor {name}: update ratio {ratio:.3g} per step size "
                f"({step_size:.3g}) is {scaled / median:.3g} × the median of the last "
                f"{len(self._history[key])} updates (accepted, or refused by this rule alone); "
                f"the bound is {self.tolerance:.3g} × (update_norm_tolerance)"
            )

    def _median(self, key: str) -> float | None:
        recent = self._history.get(key)
        if recent is None or len(recent) < self.min_history:
            return None
        return statistics.median(recent)

    def bar(self, kind: str, name: str, step_size: float = 1.0) -> float:
        """The largest ratio ``‖u‖ / ‖W‖`` tensor ``name`` may have now, for a unit of
        ``step_size`` (:meth:`step_size`) (``inf``: none)."""
        median = self._median(history_key(kind, name))
        if not median:
            return self.max_ratio
        return min(self.max_ratio, self.tolerance * median * step_size)

    def record(self, ratios: list[tuple[str, float]]) -> None:
        """Remember the ratios (per step size) of an accepted update (from :meth:`check`;
        :meth:`check` itself remembers those it refuses by rule 2 alone)."""
        for key, ratio in ratios:
            self._history[key].append(ratio)

    def history(self) -> dict[str, list[float]]:
        """The remembered ratios per statistics key, oldest first (calibration)."""
        return {key: list(values) for key, values in self._history.items()}

    def state_dict(self) -> dict:
        """What a restart needs to go on with the same bars (JSON-able; floats round-trip)."""
        return {"peak_lr": self._peak_lr, "history": self.history()}

    def load_state_dict(self, saved: dict) -> None:
        """Restore :meth:`state_dict` (a longer saved history keeps its newest ``window``).

        Raises:
            ValueError: ``saved`` is not what :meth:`state_dict` writes.
        """
        try:
            peak = float(saved["peak_lr"])
            history = {str(k): [float(v) for v in vs] for k, vs in saved["history"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"saved update bounds are malformed: {exc!r}") from exc
        self._peak_lr = peak
        self._history.clear()
        for key, values in history.items():
            self._history[key].extend(values)
