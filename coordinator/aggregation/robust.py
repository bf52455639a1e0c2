"""Robust averaging of pseudo-gradients from untrusted participants.

Volunteers are untrusted (DESIGN §6): a single sign-flipped or ×1000 update must not
move the shared layers. Both estimators work tensor by tensor on a stack ``[n, ...]``.
"""

from __future__ import annotations

import torch


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
    center = stack.median(dim=0).values
    flat = stack.reshape(stack.shape[0], -1)
    for _ in range(iters):
        diff = flat - center.reshape(1, -1)
        norms = diff.norm(dim=1).clamp_min(1e-12)
        scale = torch.clamp(tau / norms, max=1.0)
        center = center + (w[:, None] * scale[:, None] * diff).sum(0).reshape(center.shape)
    return center
