"""The training loss of one batch, one function for every trainer (DESIGN §2 stages, §3).

The central trainers (single-process and distributed) and the federated participants must
optimise the same objective, so all three call :func:`stage_loss`:

* LM loss (stages 1-3, and every federated non-distillation unit);
* ``regularise`` (stage 3, token-level routing): ``+ moe.balance_alpha · balance +
  moe.diversity_beta · diversity``. Federated participants route by document
  (``columns``), so there is no router to balance, and they hold only their own columns,
  so the coordinator applies the diversity term on the expert masters instead
  (:func:`shared_model.losses.diversity_loss` there too);
* with a :class:`Distillation` (stage 4): :func:`~shared_model.losses.kd_loss` against the
  frozen full-precision teacher, its weights in :data:`TEACHER_DTYPE`
  (:func:`freeze_teacher`). Progressive ternary is the model's own state: the caller sets
  it with ``set_ternary_fraction`` before the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from shared_model.losses import RankSum, balance_loss, diversity_loss, kd_loss
from shared_model.moe import EXPERT_WEIGHTS

if TYPE_CHECKING:
    from shared_model.model import PerspectiveModel


#: Stage 4's frozen teacher, in every trainer: its weights rounded once to bf16, and held
#: so (its logits go to :func:`~shared_model.losses.kd_loss` in FP32). Half the memory of
#: FP32, which is what ``perspective plan`` has always planned for it. Its students scored
#: as an FP32 teacher's per document (±0.001; docs/federated-training.md §5.1 "Stage 4 in
#: the bench").
TEACHER_DTYPE = torch.bfloat16


def teacher_run_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype stage 4's teacher runs in on ``device``: bf16 on a GPU; FP32 on a CPU,
    with the same bf16-rounded weights (exact in FP32). A CPU without bf16 units (AVX2)
    ran the bf16 forward 6.8x slower than FP32 on `tiny` and 7.4x on `small`."""
    return TEACHER_DTYPE if torch.device(device).type == "cuda" else torch.float32


def freeze_teacher(model: PerspectiveModel, device: torch.device | str | None = None):
    """``model``, in place, as stage 4's teacher on ``device`` (default: where it is): its
    weights rounded to :data:`TEACHER_DTYPE`, run in :func:`teacher_run_dtype`, eval mode,
    no gradients. Returns it."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dtype=TEACHER_DTYPE)  # the rounding; exact when the weights are bf16 already
    model.to(device=device, dtype=teacher_run_dtype(device))
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class Distillation:
    """Stage-4 knowledge distillation: the frozen teacher and the KL weight ``w``."""

    teacher: PerspectiveModel
    weight: float


def stage_loss(
    model: PerspectiveModel,
    x: Tensor,
    y: Tensor,
    *,
    columns: Tensor | None = None,
    distill: Distillation | None = None,
    regularise: bool = False,
    ranks: RankSum | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Training loss of one batch and a dict of its parts (detached tensors).

    Args:
        model: the model being trained (ternary fraction already set for stage 4).
        x, y: inputs and next-token targets ``[B, T]``.
        columns: ``[B]`` expert column per sequence (federated column mode), else None.
        distill: stage 4: ``(1 − w)·LM + w·KL`` against the teacher (no regularisers).
        regularise: add the router balance and expert diversity terms (stage 3).
        ranks: expert-parallel ranks, so the regularisers use global statistics.

    Returns:
        ``(loss, parts)``: parts has ``loss``, and without distillation ``lm`` (and
        ``balance`` / ``diversity`` when regularised).
    """
    if distill is not None:
        logits = model(x, columns=columns).logits
        with torch.no_grad():  # the teacher is a constant
            t_logits = distill.teacher(x, columns=columns).logits
        loss = kd_loss(logits, t_logits, y, distill.weight)
        return loss, {"loss": loss.detach()}
    out = model(x, targets=y, columns=columns)
    loss, parts = out.loss, {"lm": out.loss.detach()}
    if regularise:
        moe = model.cfg.moe
        balance = router_balance(out.aux, moe.n_experts, ranks)
        diversity = expert_diversity(model, ranks)
        loss = loss + moe.balance_alpha * balance + moe.diversity_beta * diversity
        parts.update(balance=balance.detach(), diversity=diversity.detach())
    parts["loss"] = loss.detach()
    return loss, parts


def router_balance(aux: dict, n_experts: int, ranks: RankSum | None = None) -> Tensor:
    """Mean over MoE layers of :func:`~shared_model.losses.balance_loss` of ``aux``.

    ``aux`` is :attr:`shared_model.model.ModelOutput.aux` of token-level routing. On one
    process it already holds that mean; across ranks it is recomputed with global statistics.
    """
    if ranks is None:
        return aux["balance_loss"]
    terms = [
        balance_loss(probs, index, n_experts, ranks)
        for probs, index in zip(aux["router_probs"], aux["expert_index"], strict=True)
    ]
    return torch.stack(terms).mean()


def expert_diversity(model: PerspectiveModel, ranks: RankSum | None = None) -> Tensor:
    """Mean over PDR layers of :func:`~shared_model.losses.diversity_loss` of its experts.

    Each expert is flattened to one vector of its ``w1, w2, w3`` weights. With ``ranks``
    each rank holds a slice of every layer's experts and the term is over all of them.
    """
    terms = []
    for i in model.cfg.model.pdr_layers():
        experts = model.layers[i].ffn.experts.values()
        flat = [
            torch.cat([getattr(e, w).weight.reshape(-1) for w in EXPERT_WEIGHTS]) for e in experts
        ]
        terms.append(diversity_loss(flat, ranks))
    return torch.stack(terms).mean()
