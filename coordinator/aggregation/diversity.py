"""The diversity term, applied exactly on the expert masters by the coordinator.

Participants hold only their own columns, so they cannot compute
``L_div = 1/N² Σ_{i≠j} cos(W_i, W_j)`` over all N experts of a layer. The coordinator
holds every master and takes one gradient step on ``β · L_div`` per published version.
The term is :func:`shared_model.losses.diversity_loss`, the one the central stage-3 loss
uses (O(N·P), not O(N²·P)).
"""

from __future__ import annotations

import torch

from shared_model.losses import diversity_loss


def apply_diversity(experts: list[torch.Tensor], beta: float, lr: float) -> float:
    """One in-place gradient step of ``beta * L_div`` on same-shaped expert tensors.

    The loss is ``(1/N²) Σ_{i≠j} cos(W_i, W_j)``, so descending it pushes experts apart.

    Returns:
        The diversity loss before the step.
    """
    n = len(experts)
    if n < 2 or beta == 0.0:
        return 0.0
    flat = torch.stack([e.reshape(-1).float() for e in experts]).requires_grad_(True)
    loss = diversity_loss(flat)
    (grad,) = torch.autograd.grad(beta * loss, flat)
    with torch.no_grad():
        for e, g in zip(experts, grad, strict=True):
            e.sub_(g.reshape(e.shape).to(e.dtype), alpha=lr)
    return float(loss.detach())
