"""Training losses: language modelling, router balance, expert diversity, distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class LossError(ValueError):
    """Inputs to a loss function have inconsistent shapes or values."""


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy.

    Args:
        logits: ``[..., V]`` unnormalised scores.
        targets: ``[...]`` token ids (``ignore_index`` entries are skipped).
    """
    if logits.shape[:-1] != targets.shape:
        raise LossError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: "
            "targets must have the logits' shape without the vocabulary dimension"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index
    )


def balance_loss(router_probs: Tensor, expert_index: Tensor, n_experts: int) -> Tensor:
    """Switch-Transformer load-balance loss ``E · Σ_i f_i · P_i``.

    ``f_i`` is the fraction of tokens sent to expert i, ``P_i`` the mean router probability
    of expert i. It equals 1 for uniform routing and grows as routing concentrates.

    Args:
        router_probs: ``[N, E]`` softmax router probabilities (any leading shape).
        expert_index: ``[N]`` chosen expert per token (same leading shape).
        n_experts: ``E``.
    """
    if router_probs.shape[-1] != n_experts or router_probs.shape[:-1] != expert_index.shape:
        raise LossError(
            f"router_probs {tuple(router_probs.shape)} must be [..., {n_experts}] and "
            f"expert_index {tuple(expert_index.shape)} its leading shape"
        )
    probs = router_probs.reshape(-1, n_experts).float()
    counts = torch.bincount(expert_index.reshape(-1), minlength=n_experts).to(probs.dtype)
    fraction = counts / max(expert_index.numel(), 1)
    return n_experts * (fraction * probs.mean(0)).sum()


def diversity_loss(expert_weights: list[Tensor] | Tensor) -> Tensor:
    """Expert diversity term: minus the mean pairwise cosine similarity of expert weights.

    Returns ``-1/N² Σ_{i≠j} cos(W_i, W_j)`` exactly as the seed defines it, computed in
    O(N·P) from the unit vectors: ``Σ_{i≠j} ŵ_i·ŵ_j = ||Σ_i ŵ_i||² − N``.

    Args:
        expert_weights: N tensors of one shape (flattened), or an ``[N, P]`` tensor.
    """
    if isinstance(expert_weights, Tensor):
        flat = expert_weights.reshape(expert_weights.shape[0], -1)
    else:
        if not expert_weights:
            raise LossError("diversity_loss needs at least one expert weight")
        flat = torch.stack([w.reshape(-1) for w in expert_weights])
    n = flat.shape[0]
    unit = F.normalize(flat.float(), dim=1)
    total = unit.sum(0)
    return -(total.dot(total) - n) / (n * n)


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, kd_weight: float = 0.5
) -> Tensor:
    """Distillation loss ``(1 − w)·LM + w·KL(p_student ‖ p_teacher)``.

    The issue writes KL(p_student ‖ p_teacher) (the "reverse", mode-seeking direction),
    and that is what is computed: ``Σ p_s (log p_s − log p_t)``, averaged over tokens.
    The teacher is treated as a constant (no gradient flows into it).

    Args:
        student_logits, teacher_logits: ``[..., V]``.
        targets: ``[...]`` next-token ids for the LM term.
        kd_weight: ``w`` in [0, 1].
    """
    if student_logits.shape != teacher_logits.shape:
        raise LossError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must have the same shape"
        )
    if not (0.0 <= kd_weight <= 1.0):
        raise LossError(f"kd_weight = {kd_weight!r} is invalid: allowed 0 .. 1")
    v = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.reshape(-1, v).float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().reshape(-1, v).float(), dim=-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    return (1.0 - kd_weight) * lm_loss(student_logits, targets) + kd_weight * kl
