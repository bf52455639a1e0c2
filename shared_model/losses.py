"""Training losses: language modelling, router balance, expert diversity, distillation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class LossError(ValueError):
    """Inputs to a loss function have inconsistent shapes or values."""


@dataclass(frozen=True)
class RankSum:
    """How to sum over the ranks that split one batch and each layer's experts.

    The distributed central trainer passes one so that the router balance and the expert
    diversity use *global* statistics (the single-process loss of the global batch); every
    other caller passes none.

    Attributes:
        sum: differentiable sum of a same-shaped tensor over the ranks (its backward sums
            every rank's gradient into each rank).
        world_size: number of ranks; each holds the same number of tokens and experts.
    """

    sum: Callable[[Tensor], Tensor]
    world_size: int


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


def balance_loss(
    router_probs: Tensor, expert_index: Tensor, n_experts: int, ranks: RankSum | None = None
) -> Tensor:
    """Switch-Transformer load-balance loss ``E · Σ_i f_i · P_i``.

    ``f_i`` is the fraction of tokens sent to expert i, ``P_i`` the mean router probability
    of expert i. It equals 1 for uniform routing and grows as routing concentrates.

    Args:
        router_probs: ``[N, E]`` softmax router probabilities (any leading shape).
        expert_index: ``[N]`` chosen expert per token (same leading shape).
        n_experts: ``E``.
        ranks: with expert parallelism, f and P are taken over every rank's tokens.
    """
    if router_probs.shape[-1] != n_experts or router_probs.shape[:-1] != expert_index.shape:
        raise LossError(
            f"router_probs {tuple(router_probs.shape)} must be [..., {n_experts}] and "
            f"expert_index {tuple(expert_index.shape)} its leading shape"
        )
    probs = router_probs.reshape(-1, n_experts).float()
    counts = torch.bincount(expert_index.reshape(-1), minlength=n_experts).to(probs.dtype)
    mean_prob = probs.mean(0)
    if ranks is None:
        fraction = counts / max(expert_index.numel(), 1)
    else:  # every rank holds as many tokens, so the global mean is the mean of rank means
        counts = ranks.sum(counts)
        fraction = counts / counts.sum().clamp_min(1)
        mean_prob = ranks.sum(mean_prob) / ranks.world_size
    return n_experts * (fraction * mean_prob).sum()


def diversity_loss(expert_weights: list[Tensor] | Tensor, ranks: RankSum | None = None) -> Tensor:
    """Expert diversity term: the mean pairwise cosine similarity of expert weights.

    Returns ``+1/N² Σ_{i≠j} cos(W_i, W_j)``, computed in O(N·P) from the unit vectors:
    ``Σ_{i≠j} ŵ_i·ŵ_j = ||Σ_i ŵ_i||² − N``. Minimising it pushes experts apart. The seed
    writes the term as ``-β/N² Σ cos``, which added to a loss that is minimised would pull
    the experts *together* (stage 3 exists to differentiate them): a sign error, see
    ``docs/architecture.md`` §0. This is the one implementation: the central trainers add
    ``β ·`` it to the stage-3 loss and the coordinator descends it on the expert masters of
    federated training.

    Args:
        expert_weights: N tensors of one shape (flattened), or an ``[N, P]`` tensor.
        ranks: with expert parallelism, each rank passes its own experts and the term is
            taken over all ranks' experts (N = local count × world size).
    """
    if isinstance(expert_weights, Tensor):
        flat = expert_weights.reshape(expert_weights.shape[0], -1)
    else:
        if not expert_weights:
            raise LossError("diversity_loss needs at least one expert weight")
        flat = torch.stack([w.reshape(-1) for w in expert_weights])
    n = flat.shape[0]
    total = F.normalize(flat.float(), dim=1).sum(0)
    if ranks is not None:
        total, n = ranks.sum(total), n * ranks.world_size
    return (total.dot(total) - n) / (n * n)


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
