"""Ternary quantisation of expert weights: {-1, 0, +1} x one scale per tensor.

Quantiser (TWN-style): with ``tau = threshold_factor * mean|W|`` a weight becomes
``sign(w)`` where ``|w| > tau`` and 0 elsewhere. The scale is the least-squares optimal
one for those trits, ``argmin_s ||W - s*T||^2 = <W, T> / <T, T> = mean |w| over nonzero
trits``. For a Gaussian tensor and factor 0.7 about 42 % of the trits are zero. This one
ternariser (:func:`ternarize`) serves training (the STE below), export (``.trd``) and the
ternary wire codec of FP updates (:mod:`shared_model.federated.updates`).

Progressive ternarisation (stage 4, DESIGN §2): a fraction ``f`` of the weights, those with
the largest ``|w|``, take their quantised value and the rest stay full precision. The
threshold and scale are always those of the whole tensor, so ``f = 1`` is exactly the full
quantiser. Training uses a straight-through estimator: the forward pass sees the quantised
weight, the backward pass is the identity.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

#: ``tau = THRESHOLD_FACTOR * mean|w|``: TWN's factor, the default of every ternariser here.
THRESHOLD_FACTOR = 0.7


class TernaryError(ValueError):
    """Invalid input to a ternary quantisation function."""


def _check_weight(w: Tensor) -> None:
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TernaryError("ternary quantisation needs a floating-point tensor")
    if w.numel() == 0:
        raise TernaryError("cannot quantise an empty tensor")


def _check_fraction(fraction: float) -> None:
    if not (0.0 <= float(fraction) <= 1.0):
        raise TernaryError(f"fraction = {fraction!r} is invalid: allowed 0 .. 1")


def _check_factor(threshold_factor: float) -> None:
    if not (0.0 < float(threshold_factor) < 2.0):
        raise TernaryError(f"threshold_factor = {threshold_factor!r} is invalid: allowed 0 < f < 2")


def ternarize(
    rows: Tensor,
    threshold_factor: float = THRESHOLD_FACTOR,
    *,
    accumulate: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The ternariser: trits and least-squares scale of each row of ``rows`` ``[n, P]``.

    Per row, ``tau = threshold_factor * mean|w|`` (rounded to the rows' dtype), a trit is
    ``sign(w)`` where ``|w| > tau`` and 0 elsewhere, and the scale is ``<w, t> / <t, t>``,
    i.e. the mean ``|w|`` over the nonzero trits (0 when there are none). Both means are
    accumulated in ``accumulate``: float64 by default, which makes the result independent
    of summation order (thread count, machine), as the published versions' bytes must be;
    the training STE passes the weights' dtype because it runs on every expert weight in
    every step. Non-finite rows give all-zero trits; callers that care check first.

    Returns:
        ``(trits, scale)``: trits in the rows' dtype (values -1, 0, 1; a zero may be
        ``-0.0``) and the ``[n]`` scales in the rows' dtype.
    """
    mag = rows.abs()
    tau = mag.mean(dim=1, keepdim=True, dtype=accumulate) * threshold_factor
    keep = mag > tau.to(rows.dtype)
    trits = torch.sign(rows).mul_(keep)
    total = torch.where(keep, mag, 0).sum(dim=1, dtype=accumulate)
    return trits, (total / keep.sum(dim=1).clamp_min(1)).to(rows.dtype)


def _quantize(rows: Tensor, threshold_factor: float) -> Tensor:
    """Quantised rows ``scale * trits`` (no host sync, no sorting)."""
    trits, scale = ternarize(rows, threshold_factor, accumulate=rows.dtype)
    return trits.mul_(scale[:, None])


def _progressive_rows(rows: Tensor, fraction: float) -> Tensor:
    """Per row, a mask of exactly ``round(fraction * P)`` entries with largest ``|w|``."""
    n, p = rows.shape
    k = round(float(fraction) * p)
    if k >= p:
        return torch.ones_like(rows, dtype=torch.bool)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(rows.detach().abs(), k, dim=1, sorted=False).indices, True)
    return mask


def ternary_round(w: Tensor, threshold_factor: float = THRESHOLD_FACTOR) -> tuple[Tensor, float]:
    """Quantise a tensor to trits and a least-squares scale.

    Args:
        w: floating-point weight tensor (any shape).
        threshold_factor: ``tau = threshold_factor * mean|w|``.

    Returns:
        ``(trits, scale)``: an int8 tensor of ``w``'s shape with values in {-1, 0, 1}, and
        the float scale (mean ``|w|`` over the nonzero trits; 0.0 if all trits are zero).

    Raises:
        TernaryError: ``w`` is empty, not floating point or not finite.
    """
    _check_weight(w)
    _check_factor(threshold_factor)
    w = w.detach()
    if not torch.isfinite(w).all():
        raise TernaryError("cannot quantise a tensor with NaN or infinite values")
    rows = w.to(torch.promote_types(w.dtype, torch.float32)).reshape(1, -1)
    trits, scale = ternarize(rows, threshold_factor)
    return trits.view_as(w).to(torch.int8), float(scale[0])


def dequantize(trits: Tensor, scale: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Turn ``(trits, scale)`` back into a weight tensor ``scale * trits``.

    Raises:
        TernaryError: ``trits`` holds values outside {-1, 0, 1}.
    """
    if trits.is_floating_point() or trits.dtype == torch.bool:
        raise TernaryError(f"trits must be an integer tensor, got {trits.dtype}")
    if trits.numel() and (trits.min() < -1 or trits.max() > 1):
        raise TernaryError("trits must only contain -1, 0 and 1")
    return trits.to(dtype) * float(scale)


def is_ternary(w: Tensor, rtol: float = 1e-6) -> bool:
    """Whether ``w`` is its own ternary value ``scale * trits`` (within ``rtol`` × scale).

    A tensor that travelled as trits (``base + (trits·scale − base)`` in float32) may sit
    an ulp away from ``trits·scale``; the tolerance covers that, not a real FP tensor.
    """
    trits, scale = ternary_round(w)
    return bool(((dequantize(trits, scale) - w.float()).abs() <= rtol * scale).all())


def progressive_mask(w: Tensor, fraction: float) -> Tensor:
    """Boolean mask selecting exactly ``round(fraction * numel)`` entries with largest ``|w|``.

    Raises:
        TernaryError: ``fraction`` outside [0, 1] or ``w`` not a float tensor.
    """
    _check_weight(w)
    _check_fraction(fraction)
    return _progressive_rows(w.reshape(1, -1), fraction).view_as(w)


class _TernarySTE(torch.autograd.Function):
    """Forward: (progressively) quantised weight. Backward: identity.

    With ``stacked`` the leading dimension indexes independent tensors (own τ, scale, mask).
    """

    @staticmethod
    def forward(ctx, w: Tensor, fraction: float, threshold_factor: float, stacked: bool):  # noqa: D102
        rows = w.reshape(w.shape[0] if stacked else 1, -1)
        q = _quantize(rows, threshold_factor)
        if fraction < 1.0:
            q = torch.where(_progressive_rows(rows, fraction), q, rows)
        return q.view_as(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: D102
        return grad, None, None, None


def ternary_ste(
    w: Tensor, fraction: float = 1.0, threshold_factor: float = THRESHOLD_FACTOR
) -> Tensor:
    """Straight-through progressive ternarisation of ``w``.

    Args:
        w: the full-precision latent weight.
        fraction: share of entries (largest ``|w|`` first) replaced by their quantised
            value; 1.0 quantises everything (one abs-mean and a compare, no sorting).
        threshold_factor: see :func:`ternary_round`.

    Returns:
        A tensor equal to the quantised weight whose gradient w.r.t. ``w`` is the identity.
    """
    _check_fraction(fraction)
    _check_factor(threshold_factor)
    if fraction <= 0.0:
        return w
    return _TernarySTE.apply(w, float(fraction), float(threshold_factor), False)


def ternary_ste_stacked(
    weights: list[Tensor], fraction: float = 1.0, threshold_factor: float = THRESHOLD_FACTOR
) -> list[Tensor]:
    """:func:`ternary_ste` of several same-shape tensors in one batch of kernels.

    Each tensor keeps its own threshold, scale and mask; the result equals applying
    :func:`ternary_ste` to each. Batching matters on GPUs, where quantising 16 experts one
    by one is dominated by kernel-launch overhead.
    """
    _check_fraction(fraction)
    _check_factor(threshold_factor)
    if fraction <= 0.0:
        return list(weights)
    if len(weights) == 1:
        return [ternary_ste(weights[0], fraction, threshold_factor)]
    stacked = torch.stack(weights)
    q = _TernarySTE.apply(stacked, float(fraction), float(threshold_factor), True)
    return list(q.unbind(0))


_EXPERT_RE = re.compile(r"^layers\.\d+\.ffn\.experts\.\d+\.w[123]\.weight$")


def export_ternary(
    model: nn.Module, threshold_factor: float = THRESHOLD_FACTOR
) -> dict[str, tuple[Tensor, float]]:
    """Quantise every expert weight of a model.

    Args:
        model: a :class:`~shared_model.model.PerspectiveModel` (MoE mode) or any module whose
            expert parameters follow ``layers.{i}.ffn.experts.{e}.{w1,w2,w3}.weight``.
        threshold_factor: see :func:`ternary_round`.

    Returns:
        ``{parameter name: (int8 trits, scale)}`` for every expert weight, in name order.
    """
    out: dict[str, tuple[Tensor, float]] = {}
    for name, param in model.named_parameters():
        if _EXPERT_RE.match(name):
            out[name] = ternary_round(param, threshold_factor)
    return out
