"""Robust averaging of pseudo-gradients from untrusted participants.

Volunteers are untrusted (DESIGN §6): a single sign-flipped or ×1000 update must not
move the shared layers. The estimators work tensor by tensor on a stack ``[n, ...]``;
:func:`robust_reducer` picks one by name (``FederationSettings.aggregator``):

* ``mean`` — the plain mean (no protection);
* ``trimmed_mean`` — coordinate-wise, ``trim`` results dropped at each end;
* ``median`` — the coordinate-wise median;
* ``centered_clip`` — CenteredClip around the coordinate-wise median with a radius of
  ``clip_factor`` × the median norm of the buffer's updates (scale-free, so one default
  fits every tensor and preset).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from coordinator.federation_settings import AGGREGATORS

#: ``reduce(stack [n, ...], weights [n]) -> [...]``
Reducer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def trimmed_mean(stack: torch.Tensor, weights: torch.Tensor, trim: int) -> torch.Tensor:
    """Coordinate-wise weighted mean after dropping the ``trim`` lowest and highest values.

    With fewer than ``2 * trim + 1`` updates nothing is trimmed (there is no majority
    to protect); the caller bounds norms separately.
    """
    n = stack.shape[0]
    w = weights.to(stack.dtype).view(-1, *([1] * (stack.dim() - 1))).expand_as(stack)
    if trim <= 0 or n < 2 * trim + 1:
        return (stack * w).sum(0) / w.sum(0)
    order = stack.argsort(dim=0)
    kept = order[trim : n - trim]
    vals = stack.gather(0, kept)
    wk = w.gather(0, kept)
    return (vals * wk).sum(0) / wk.sum(0)


def centered_clip(
    stack: torch.Tensor, weights: torch.Tensor, tau: float, iters: int = 3
) -> torch.Tensor:
    """CenteredClip (Karimireddy et al.): iteratively average updates clipped around a centre.

    Each update's deviation from the current centre is clipped to L2 norm ``tau``
    (hivemind/BTARD use this against large malicious updates).
    """
    w = weights.to(stack.dtype)
    w = w / w.sum()
    center = coordinate_median(stack)
    flat = stack.reshape(stack.shape[0], -1)
    for _ in range(iters):
        diff = flat - center.reshape(1, -1)
        norms = diff.norm(dim=1).clamp_min(1e-12)
        scale = torch.clamp(tau / norms, max=1.0)
        center = center + (w[:, None] * scale[:, None] * diff).sum(0).reshape(center.shape)
    return center


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; with an even count the mean of the two middle values
    (``torch.median`` takes the lower one, a bias toward negative values)."""
    n = stack.shape[0]
    ordered = stack.sort(dim=0).values
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def relative_centered_clip(
    stack: torch.Tensor, weights: torch.Tensor, factor: float, iters: int = 3
) -> torch.Tensor:
    """:func:`centered_clip` with ``tau = factor ×`` the median L2 norm of the updates."""
    norms = stack.reshape(stack.shape[0], -1).norm(dim=1)
    tau = float(norms.median()) * factor
    if tau <= 0.0:
        return coordinate_median(stack)
    return centered_clip(stack, weights, tau, iters)


def robust_reducer(name: str, *, trim: int, clip_factor: float) -> Reducer:
    """The reducer called ``name`` (one of :data:`AGGREGATORS`).

    Raises:
        ValueError: an unknown name.
    """
    if name == "mean":
        return lambda stack, w: trimmed_mean(stack, w, 0)
    if name == "trimmed_mean":
        return lambda stack, w: trimmed_mean(stack, w, trim)
    if name == "median":
        return lambda stack, w: coordinate_median(stack)
    if name == "centered_clip":
        return lambda stack, w: relative_centered_clip(stack, w, clip_factor)
    raise ValueError(f"aggregator {name!r} is unknown: allowed {', '.join(AGGREGATORS)}")
