"""Optimiser construction and step-indexed schedules (learning rate, ternary fraction).

Everything here is a pure function of the step number, so a resumed run recomputes the
same values as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from shared_model.config import OptimConfig
from shared_model.moe import is_expert_param


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Linear warmup to ``optim.lr`` over ``warmup_steps``, then cosine to ``min_lr``.

    Args:
        step: 0-based optimiser step about to be taken.
        optim: optimiser settings.
        total_steps: steps in the whole stage (the cosine reaches ``min_lr`` there).
    """
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    if warmup and step < warmup:
        return optim.lr * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


def ternary_fraction_at(step: int, total_steps: int, schedule: Iterable[float]) -> float:
    """Progressive ternary fraction: the schedule's phases spread evenly over the steps.

    With schedule ``(0.25, 0.5, 0.75, 1.0)`` and 100 steps, steps 0-24 use 0.25, 25-49
    use 0.5, and so on; the last phase (all weights ternary) runs to the end.
    """
    phases = list(schedule)
    phase = min(len(phases) - 1, step * len(phases) // max(total_steps, 1))
    return float(phases[phase])


def _no_decay(module: nn.Module, param_name: str, param: nn.Parameter) -> bool:
    # Norm gains, biases, embeddings and 1-D parameters (e.g. PDR decays) are not decayed.
    return param.dim() < 2 or isinstance(module, nn.Embedding) or "norm" in param_name


def build_optimizer(
    model: nn.Module,
    optim: OptimConfig,
    trainable: Iterable[str] | None = None,
    *,
    split_experts: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, grouped by decay / no decay.

    Args:
        model: the model.
        optim: hyper-parameters (``lr`` is overwritten each step by :func:`set_lr`).
        trainable: optional parameter names to optimise; others are frozen
            (``requires_grad=False``). None trains every parameter.
        split_experts: put the expert columns in groups of their own (flagged
            ``"experts"``), so that :func:`set_lr` can scale their lr; default: when
            ``optim.expert_lr_scale`` is not 1. Unsplit, the two groups are those of
            optimiser states saved before the split existed.
    """
    split = optim.expert_lr_scale != 1.0 if split_experts is None else split_experts
    names = None if trainable is None else set(trainable)
    params: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (e, d): [] for e in ((False, True) if split else (False,)) for d in (True, False)
    }
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if names is not None and full not in names:
                param.requires_grad_(False)
                continue
            expert = split and is_expert_param(full)[0]
            params[expert, not _no_decay(module, full, param)].append(param)
    # Split, an empty group is left out (torch's distributed checkpoint takes one at most;
    # a dense model has no experts, and experts have no undecayed parameters).
    groups = [
        {"params": ps, "weight_decay": optim.weight_decay if decay else 0.0}
        | ({"experts": expert} if split else {})
        for (expert, decay), ps in params.items()
        if ps or not split
    ]
    # foreach=False: the single-tensor path is bit-reproducible across save/resume on CPU.
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), foreach=False)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, expert_scale: float = 1.0) -> None:
    """Set the learning rate of every parameter group: ``lr``, times ``expert_scale`` for
    the expert columns' groups (``build_optimizer(split_experts=True)``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * expert_scale if group.get("experts") else lr


def set_scheduled_lr(
    optimizer: torch.optim.Optimizer, step: int, optim: OptimConfig, total_steps: int
) -> None:
    """Set the lr of central training step ``step`` of ``total_steps``: :func:`lr_at`,
    with the expert columns' groups at ``optim.expert_lr_scale`` times it."""
    set_lr(optimizer, lr_at(step, optim, total_steps), optim.expert_lr_scale)
